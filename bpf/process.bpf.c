/* process: fork, exec and exit of processes in watched cgroups (comm, filename, exit code).
 * Raw tracepoints; their arguments (TP_PROTO, Linux 6.18) are in the comment of each. */
#include "agentcg.h"

#define CLONE_THREAD 0x00010000
#define SIGSTOP_NR 19
/* signals whose default action neither terminates nor dumps core */
#define NOT_FATAL_MASK ((1ULL << 17) | (1ULL << 18) | (1ULL << 19) | (1ULL << 20) | \
                        (1ULL << 21) | (1ULL << 22) | (1ULL << 23) | (1ULL << 28))

BPF_TABLE("lru_hash", u32, struct acg_exit, exits, MAX_TASKS);

/* task_newtask(struct task_struct *task, unsigned long clone_flags): runs in the parent's
 * context, so the child starts in the parent's cgroup. */
int acg_process__task__task_newtask(struct bpf_raw_tracepoint_args *ctx)
{
    u64 cg;
    struct acg_counters *c = acg_current(&cg);
    if (!c)
        return 0;
    u32 child = acg_read_u32((void *)ctx->args[0], ACG_OFF_TASK_PID);
    u64 clone_flags = ctx->args[1];
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = pid_tgid, tgid = pid_tgid >> 32;
    struct acg_task *self = tasks.lookup(&tid);
    u32 self_ppid = self ? self->ppid : 0;
    if (!self)
        acg_track_tgid(tid, tgid, cg, 0, 0);
    if (clone_flags & CLONE_THREAD) {
        __sync_fetch_and_add(&c->threads, 1);
        /* a thread shares its process's parent; the last thread out reports the exit */
        acg_track_new(child, tgid, cg, self_ppid);
    } else {
        __sync_fetch_and_add(&c->forks, 1);
        acg_track_new(child, child, cg, tgid);
    }
    return 0;
}

/* sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm):
 * p is current, and after exec its thread id is its process id. */
int acg_process__sched__sched_process_exec(struct bpf_raw_tracepoint_args *ctx)
{
    u64 cg;
    struct acg_counters *c = acg_current(&cg);
    if (!c)
        return 0;
    __sync_fetch_and_add(&c->execs, 1);
    u32 pid = bpf_get_current_pid_tgid() >> 32, old_pid = ctx->args[1];
#ifdef ACG_CONCERN_FAULTS
    struct acg_stamp fresh_mm = {.cgroup_id = cg, .ns = 0};
    mm_fresh.update(&pid, &fresh_mm);
#endif
    u32 ppid = 0;
    struct acg_task *t = tasks.lookup(&pid);
    if (t) {            /* the common case: forked in the cgroup, tracked since */
        ppid = t->ppid;
        t->cgroup_id = cg;
        t->tgid = pid;
    } else {
        if (old_pid != pid) {   /* a thread exec'd: it took the leader's pid */
            struct acg_task *old = tasks.lookup(&old_pid);
            if (old)
                ppid = old->ppid;
        }
        acg_track_tgid(pid, pid, cg, ppid, 0);
#ifdef ACG_CONCERN_SCHED
        t = tasks.lookup(&pid);
        if (t)
            acg_charge_sched(c, t);  /* first seen here: its counters so far are not the cgroup's */
#endif
    }
    struct acg_event *e = acg_reserve_sized(EV_EXEC, cg, pid, sizeof(struct acg_event));
    if (!e)
        return 0;
    e->ppid = ppid;
    /* Stopped only once its event is reserved: user space is then sure to see it and send
     * SIGCONT (woken at once). The stop takes effect before the new image runs. */
    int urgent = 0, zero = 0;
    u32 *stops = stop_watches.lookup(&zero);
    if (stops && *stops) {
        struct acg_watch *w = watched.lookup(&cg);
        if (w && (w->flags & WATCH_STOP_AT_EXEC) && bpf_send_signal(SIGSTOP_NR) == 0) {
            e->aux = 1;
            urgent = 1;
        }
    }
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    const char *filename = NULL;
    bpf_probe_read_kernel(&filename, sizeof(filename), (char *)ctx->args[2] + ACG_OFF_BINPRM_FILENAME);
    if (filename)
        bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), filename);
    acg_submit(e, urgent);
    return 0;
}

/* signal_generate(int sig, struct kernel_siginfo *info, struct task_struct *task, int group,
 * int result): a default-fatal signal sent to a tracked process. The kernel turns most of
 * them into SIGKILL before delivery (complete_signal), so the original number is kept here.
 * It runs in the sender's context: the target's cgroup is found in `tasks`. */
int acg_process__signal__signal_generate(struct bpf_raw_tracepoint_args *ctx)
{
    int sig = ctx->args[0];
    if (sig <= 0 || sig > 63 || (NOT_FATAL_MASK & (1ULL << sig)) || (int)ctx->args[4] != 0)
        return 0;
    u32 pid = acg_read_u32((void *)ctx->args[2], ACG_OFF_TASK_PID);
    struct acg_task *t = tasks.lookup(&pid);
    if (!t || !acg_counters_of(t->cgroup_id))
        return 0;
    u32 tgid = t->tgid ? t->tgid : pid;
    struct acg_exit *old = exits.lookup(&tgid);
    if (old && old->signal)
        return 0;  /* the first fatal signal wins */
    struct acg_exit x = {.cgroup_id = t->cgroup_id, .exit_code = -1, .signal = sig};
    exits.update(&tgid, &x);
    acg_note_exit(tgid, tgid == pid ? t : NULL);
    return 0;
}

/* signal_deliver(int sig, struct kernel_siginfo *info, struct k_sigaction *ka) */
int acg_process__signal__signal_deliver(struct bpf_raw_tracepoint_args *ctx)
{
    /* the common case (SIGCHLD to a shell, ...) ends here, before the cgroup filter (a
     * register test is cheaper than its map lookup): `exits` only ever holds default-fatal
     * signals, so a non-fatal one has nothing to record or clear */
    int sig = ctx->args[0];
    if (sig <= 0 || sig > 63 || (NOT_FATAL_MASK & (1ULL << sig)))
        return 0;
    u64 cg;
    if (!acg_current(&cg))
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 handler = 0;
    bpf_probe_read_kernel(&handler, sizeof(handler), (char *)ctx->args[2] + ACG_OFF_KSIGACTION_HANDLER);
    struct acg_exit *old = exits.lookup(&tgid);
    if (handler != 0 && sig != 9) {
        /* caught: the pending fatal signal did not kill it */
        if (old && old->signal == sig)
            exits.delete(&tgid);
        return 0;
    }
    if (old && old->signal && sig == 9)
        return 0;  /* SIGKILL standing in for the signal recorded at generation */
    struct acg_exit x = {.cgroup_id = cg, .exit_code = -1, .signal = sig};
    exits.update(&tgid, &x);
    acg_note_exit(tgid, NULL);
    return 0;
}

/* sched_process_exit(struct task_struct *p, bool group_dead): p is current. Tasks that
 * exit outside watched cgroups leave their (LRU) entries to be reused. */
int acg_process__sched__sched_process_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 cg;
    struct acg_counters *c = acg_current(&cg);
    if (!c)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = pid_tgid, tgid = pid_tgid >> 32;
    struct acg_task *t = tasks.lookup(&tid);
    u32 ppid = t ? t->ppid : 0;
    /* `exits` is looked up only where it may hold this process: its leader was marked, or
     * the leader's entry is not at hand (another thread exits last, or none was tracked) */
    int may_have_exit = !t || tid != tgid || (t->flags & TASK_EXIT_NOTED);
#ifdef ACG_CONCERN_EXIT_CODES
    may_have_exit = 1;   /* exit_group(2) statuses are in `exits` for every process */
#endif
#ifdef ACG_CONCERN_SCHED
    if (t)
        acg_charge_sched(c, t);  /* its last slice: no switch-out follows in the cgroup */
#endif
    if (t)
        tasks.delete(&tid);
#ifdef ACG_CONCERN_FAULTS
    mm_fresh.delete(&tid);  /* exec'd, but its new mm never reported in the cgroup */
#endif
    if (!(ctx->args[1] & 0xff))
        return 0;
    struct acg_exit *x = may_have_exit ? exits.lookup(&tgid) : NULL;
    s32 code = x ? x->exit_code : -1, sig = x ? x->signal : 0;
    if (x)
        exits.delete(&tgid);
    __sync_fetch_and_add(&c->exits, 1);
    struct acg_event *e = acg_reserve(EV_EXIT, cg, tgid);
    if (!e)
        return 0;
    e->ppid = ppid;
    e->exit_code = sig ? -1 : code;
    e->signal = sig;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    acg_submit(e, 0);
    return 0;
}
