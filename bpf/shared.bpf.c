/* Maps every concern uses, and the helpers that filter on them. Always loaded first.
 *
 * Hot programs are raw tracepoints (`struct bpf_raw_tracepoint_args *ctx`): the arguments
 * are the tracepoint's TP_PROTO values (docs/ebpf.md lists them, tests/bpf/test_btf.py
 * checks them against the running kernel), and a member of a struct they point to is read
 * with bpf_probe_read_kernel at an offset from the running kernel's BTF (ACG_OFF_*,
 * bpf/btf.py), never from kernel headers. Rare events stay classic tracepoints.
 *
 * Per-task entries (tasks, exits, reclaim_start, ...) are removed by the kernel side when the
 * task exits or the stamp is used, and live in LRU maps, so a leftover (a task that moved
 * out and never exited in a watched cgroup) cannot fill them: user space never walks them. */
#include "agentcg.h"

BPF_HASH(watched, u64, struct acg_watch, MAX_CGROUPS);
BPF_HASH(counters, u64, struct acg_counters, MAX_CGROUPS);
BPF_TABLE("lru_hash", u32, struct acg_task, tasks, MAX_TASKS);
BPF_PERCPU_ARRAY(errors, u64, ERR_SLOTS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
/* events submitted without a wake-up since the last one that woke the reader (bcc 0.26
 * cannot call bpf_ringbuf_query on a bcc map, so the batch is counted here) */
struct acg_unwoken {
    u64 events;     /* submitted without a wake-up since the last one */
    u64 first_ns;   /* when the oldest of them was reserved */
};
BPF_ARRAY(unwoken, struct acg_unwoken, 1);
/* [0]: how many watched cgroups have WATCH_STOP_AT_EXEC (user space keeps it); 0 spares the
 * exec program its `watched` lookup (a constant-key array lookup is inlined: no map walk) */
BPF_ARRAY(stop_watches, u32, 1);
#ifdef ACG_CONCERN_FAULTS
/* tid -> cgroup: the task exec'd in a watched cgroup (process concern) and the faults
 * concern has not seen its new mm yet; that mm starts empty, so all of it counts. */
BPF_TABLE("lru_hash", u32, struct acg_stamp, mm_fresh, MAX_TASKS);
#endif

static __always_inline void acg_error(int slot)
{
    u64 *n = errors.lookup(&slot);
    if (n)
        (*n)++;
}

/* The counters of `cgroup_id`, or NULL when it is not watched: the filter every program
 * running in the watched task's context applies first. */
static __always_inline struct acg_counters *acg_counters_of(u64 cgroup_id)
{
    return counters.lookup(&cgroup_id);
}

static __always_inline struct acg_counters *acg_current(u64 *cgroup_id)
{
    u64 id = bpf_get_current_cgroup_id();
    *cgroup_id = id;
    return counters.lookup(&id);
}

/* A u32 member of a kernel struct, at an offset from the running kernel's BTF. */
static __always_inline u32 acg_read_u32(void *base, u64 offset)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)base + offset);
    return v;
}

/* A record of `size` bytes: ACG_EVENT_HEAD (all but the file name) for every kind but
 * exec, sizeof(struct acg_event) for exec. Short records touch 2 cache lines of the ring
 * instead of 6; user space zero-fills what a record leaves out (bpf/monitor.py). */
#define ACG_EVENT_HEAD __builtin_offsetof(struct acg_event, filename)

static __always_inline struct acg_event *acg_reserve_sized(u32 kind, u64 cgroup_id, u32 pid, u64 size)
{
    struct acg_event *e = events.ringbuf_reserve(size);
    if (!e) {
        acg_error(ERR_RINGBUF_FULL);
        return NULL;
    }
    __builtin_memset(e, 0, ACG_EVENT_HEAD);
    if (size > ACG_EVENT_HEAD)
        e->filename[0] = 0;
    e->ktime_ns = bpf_ktime_get_ns();
    e->kind = kind;
    e->cgroup_id = cgroup_id;
    e->pid = pid;
    e->exit_code = -1;
    return e;
}

/* A short record (no file name: the verifier rejects a write to e->filename) */
static __always_inline struct acg_event *acg_reserve(u32 kind, u64 cgroup_id, u32 pid)
{
    return acg_reserve_sized(kind, cgroup_id, pid, ACG_EVENT_HEAD);
}

/* Submit; wake the reader for an urgent event, for every WAKE_BATCH_EVENTS-th, and for
 * the first one submitted WAKE_AFTER_NS after the oldest still unannounced one. A lone
 * event is read at the reader's next poll timeout (or tick), not woken for. */
static __always_inline void acg_submit(struct acg_event *e, int urgent)
{
    int zero = 0;
    struct acg_unwoken *u = unwoken.lookup(&zero);
    if (!urgent && u) {
        u64 n = __sync_fetch_and_add(&u->events, 1);
        if (n == 0)
            u->first_ns = e->ktime_ns;
        if (n + 1 < WAKE_BATCH_EVENTS && e->ktime_ns - u->first_ns < WAKE_AFTER_NS) {
            events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
            return;
        }
    }
    if (u)
        u->events = 0;
    events.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
}

/* Remembers that `tid` belongs to `cgroup_id`, for tracepoints that fire outside its context.
 * new_task: it was just forked (its scheduler counters start at 0). */
static __always_inline void acg_track_tgid(u32 tid, u32 tgid, u64 cgroup_id, u32 ppid, u32 new_task)
{
    struct acg_task *t = tasks.lookup(&tid);
    if (t) {
        t->cgroup_id = cgroup_id;
        if (ppid)
            t->ppid = ppid;
        if (tgid)
            t->tgid = tgid;
        return;
    }
    struct acg_task fresh = {.cgroup_id = cgroup_id, .ppid = ppid, .tgid = tgid, .has_base = new_task};
    if (tasks.update(&tid, &fresh))
        acg_error(ERR_TASKS_FULL);
}

/* A task just forked: a fresh entry, over any stale one a reused tid left (no lookup). */
static __always_inline void acg_track_new(u32 tid, u32 tgid, u64 cgroup_id, u32 ppid)
{
    struct acg_task fresh = {.cgroup_id = cgroup_id, .ppid = ppid, .tgid = tgid, .has_base = 1};
    if (tasks.update(&tid, &fresh))
        acg_error(ERR_TASKS_FULL);
}

/* Marks the leader of `tgid` as having an `exits` entry (see TASK_EXIT_NOTED). */
static __always_inline void acg_note_exit(u32 tgid, struct acg_task *t_of_tgid)
{
    struct acg_task *leader = t_of_tgid ? t_of_tgid : tasks.lookup(&tgid);
    if (leader)
        leader->flags |= TASK_EXIT_NOTED;
}

/* As acg_track_tgid; the tgid is known only when `tid` is the current thread. */
static __always_inline void acg_track(u32 tid, u64 cgroup_id, u32 ppid)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    acg_track_tgid(tid, (u32)pid_tgid == tid ? pid_tgid >> 32 : 0, cgroup_id, ppid, 0);
}

#ifdef ACG_CONCERN_SCHED
static __always_inline u32 acg_log2(u64 v)
{
    u32 r = 0, shift;
    shift = (v > 0xFFFFFFFFULL) << 5; v >>= shift; r |= shift;
    shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
    shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
    shift = (v > 0xF) << 2; v >>= shift; r |= shift;
    shift = (v > 0x3) << 1; v >>= shift; r |= shift;
    r |= (v >> 1);
    return r;
}

/* Charges the current task's CPU time and run-queue waits since its bases (its own
 * scheduler counters, kept up to date by the kernel: se.sum_exec_runtime is updated before
 * sched_switch fires, sched_info.run_delay/pcount at each arrival on a CPU), then moves the
 * bases on. The first time a task is seen (moved in after it started) only takes them. */
static __always_inline void acg_charge_sched(struct acg_counters *c, struct acg_task *t)
{
    char *task = (char *)bpf_get_current_task();
    u64 runtime = 0, delay = 0, pcount = 0;
    bpf_probe_read_kernel(&runtime, sizeof(runtime), task + ACG_OFF_TASK_RUNTIME);
#if ACG_OFF_TASK_RUN_DELAY == ACG_OFF_TASK_PCOUNT + 8
    u64 info[2] = {};   /* struct sched_info { pcount; run_delay; ... }: one read */
    bpf_probe_read_kernel(info, sizeof(info), task + ACG_OFF_TASK_PCOUNT);
    pcount = info[0];
    delay = info[1];
#else
    bpf_probe_read_kernel(&delay, sizeof(delay), task + ACG_OFF_TASK_RUN_DELAY);
    bpf_probe_read_kernel(&pcount, sizeof(pcount), task + ACG_OFF_TASK_PCOUNT);
#endif
    if (t->has_base && runtime >= t->base_runtime_ns && pcount >= t->base_pcount &&
        delay >= t->base_run_delay_ns) {
        __sync_fetch_and_add(&c->cpu_ns, runtime - t->base_runtime_ns);
        u64 waits = pcount - t->base_pcount;
        if (waits) {
            u32 slot = acg_log2((delay - t->base_run_delay_ns) / waits);
            if (slot >= HIST_SLOTS)
                slot = HIST_SLOTS - 1;
            __sync_fetch_and_add(&c->runq_slots[slot], waits);
        }
    }
    t->base_runtime_ns = runtime;
    t->base_run_delay_ns = delay;
    t->base_pcount = pcount;
    t->has_base = 1;
}
#endif

/* Entries of a removed cgroup are removed by user space when it reads this event. */
int acg_shared__cgroup__cgroup_rmdir(struct tracepoint__cgroup__cgroup_rmdir *args)
{
    u64 id = args->id;
    if (args->root != V2_HIERARCHY_ID || !watched.lookup(&id))
        return 0;
    watched.delete(&id);
    struct acg_event *e = acg_reserve(EV_CGROUP_REMOVED, id, 0);
    if (e)
        acg_submit(e, 0);
    return 0;
}
