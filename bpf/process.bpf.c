/* process: fork, exec and exit of processes in watched cgroups (comm, filename, exit code). */
#include "agentcg.h"

#define CLONE_THREAD 0x00010000
#define SIGSTOP_NR 19
/* signals whose default action neither terminates nor dumps core */
#define NOT_FATAL_MASK ((1ULL << 17) | (1ULL << 18) | (1ULL << 19) | (1ULL << 20) | \
                        (1ULL << 21) | (1ULL << 22) | (1ULL << 23) | (1ULL << 28))

BPF_HASH(exits, u32, struct acg_exit, MAX_TASKS);

/* Runs in the parent's context, so the child starts in the parent's cgroup. */
int acg_process__task__task_newtask(struct tracepoint__task__task_newtask *args)
{
    u64 cg;
    struct acg_counters *c = acg_current(&cg);
    if (!c)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = pid_tgid, tgid = pid_tgid >> 32;
    acg_track(tid, cg, 0);
    if (args->clone_flags & CLONE_THREAD) {
        __sync_fetch_and_add(&c->threads, 1);
        /* a thread shares its process's parent; the last thread out reports the exit */
        struct acg_task *self = tasks.lookup(&tid);
        acg_track_tgid(args->pid, tgid, cg, self ? self->ppid : 0);
    } else {
        __sync_fetch_and_add(&c->forks, 1);
        acg_track_tgid(args->pid, args->pid, cg, tgid);
    }
    return 0;
}

int acg_process__sched__sched_process_exec(struct tracepoint__sched__sched_process_exec *args)
{
    u64 cg;
    struct acg_counters *c = acg_current(&cg);
    if (!c)
        return 0;
    __sync_fetch_and_add(&c->execs, 1);
    u32 pid = args->pid, old_pid = args->old_pid;
#ifdef ACG_CONCERN_MEMORY
    struct acg_stamp fresh_mm = {.cgroup_id = cg, .ns = bpf_ktime_get_ns()};
    mm_fresh.update(&pid, &fresh_mm);
#endif
    u32 ppid = 0;
    struct acg_task *t = tasks.lookup(&pid);
    if (!t && old_pid != pid)
        t = tasks.lookup(&old_pid);
    if (t)
        ppid = t->ppid;
    acg_track(pid, cg, ppid);
    struct acg_event *e = acg_reserve(EV_EXEC, cg, pid);
    if (!e)
        return 0;
    e->ppid = ppid;
    /* Stopped only once its event is reserved: user space is then sure to see it and send
     * SIGCONT. The stop takes effect before the new image runs a single instruction. */
    struct acg_watch *w = watched.lookup(&cg);
    if (w && (w->flags & WATCH_STOP_AT_EXEC) && bpf_send_signal(SIGSTOP_NR) == 0)
        e->aux = 1;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    unsigned short off = args->data_loc_filename & 0xFFFF;
    bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), (void *)args + off);
    events.ringbuf_submit(e, 0);
    return 0;
}

/* A default-fatal signal sent to a tracked process. The kernel turns most of them into
 * SIGKILL before delivery (complete_signal), so the original number is kept here. args->pid
 * is the target thread; the exit path and signal_deliver look the signal up by its process. */
int acg_process__signal__signal_generate(struct tracepoint__signal__signal_generate *args)
{
    int sig = args->sig;
    if (sig <= 0 || sig > 63 || (NOT_FATAL_MASK & (1ULL << sig)) || args->result != 0)
        return 0;
    u32 pid = args->pid;
    struct acg_task *t = tasks.lookup(&pid);
    if (!t)
        return 0;
    u32 tgid = t->tgid ? t->tgid : pid;
    struct acg_exit *old = exits.lookup(&tgid);
    if (old && old->signal)
        return 0;  /* the first fatal signal wins */
    struct acg_exit x = {.cgroup_id = t->cgroup_id, .exit_code = -1, .signal = sig};
    exits.update(&tgid, &x);
    return 0;
}

int acg_process__signal__signal_deliver(struct tracepoint__signal__signal_deliver *args)
{
    int sig = args->sig;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct acg_exit *old = exits.lookup(&tgid);
    if (args->sa_handler != 0 && sig != 9) {
        /* caught: the pending fatal signal did not kill it */
        if (old && old->signal == sig)
            exits.delete(&tgid);
        return 0;
    }
    if (sig <= 0 || sig > 63 || (NOT_FATAL_MASK & (1ULL << sig)))
        return 0;
    u64 cg = bpf_get_current_cgroup_id();
    if (!watched.lookup(&cg))
        return 0;
    if (old && old->signal && sig == 9)
        return 0;  /* SIGKILL standing in for the signal recorded at generation */
    struct acg_exit x = {.cgroup_id = cg, .exit_code = -1, .signal = sig};
    exits.update(&tgid, &x);
    return 0;
}

int acg_process__sched__sched_process_exit(struct tracepoint__sched__sched_process_exit *args)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = pid_tgid, tgid = pid_tgid >> 32;
    struct acg_task *t = tasks.lookup(&tid);
    u32 ppid = t ? t->ppid : 0;
    tasks.delete(&tid);
    if (!args->group_dead)
        return 0;
    struct acg_exit *x = exits.lookup(&tgid);
    s32 code = x ? x->exit_code : -1, sig = x ? x->signal : 0;
    if (x)
        exits.delete(&tgid);
    u64 cg;
    struct acg_counters *c = acg_current(&cg);
    if (!c)
        return 0;
    __sync_fetch_and_add(&c->exits, 1);
    struct acg_event *e = acg_reserve(EV_EXIT, cg, tgid);
    if (!e)
        return 0;
    e->ppid = ppid;
    e->exit_code = sig ? -1 : code;
    e->signal = sig;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    events.ringbuf_submit(e, 0);
    return 0;
}
