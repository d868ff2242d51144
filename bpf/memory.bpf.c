/* memory: memcg and direct reclaim stall time, and OOM victims, per watched cgroup. Rare
 * events, so classic tracepoints. Memory sizes per call come from the kernel's own
 * per-cgroup accounting (memory.usage_in_bytes / memory.current, ...); the per-fault
 * programs that count RSS from page faults are the opt-in concern `faults`. */
#include "agentcg.h"

BPF_TABLE("lru_hash", u32, struct acg_stamp, reclaim_start, MAX_TASKS);

static __always_inline int acg_reclaim_begin(void)
{
    u64 cg;
    if (!acg_current(&cg))
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    struct acg_stamp s = {.cgroup_id = cg, .ns = bpf_ktime_get_ns()};
    reclaim_start.update(&tid, &s);
    return 0;
}

static __always_inline int acg_reclaim_end(void)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct acg_stamp *s = reclaim_start.lookup(&tid);
    if (!s)
        return 0;
    u64 cg = s->cgroup_id;
    u64 stall = bpf_ktime_get_ns() - s->ns;
    reclaim_start.delete(&tid);
    struct acg_counters *c = counters.lookup(&cg);
    if (!c)
        return 0;
    __sync_fetch_and_add(&c->reclaim_ns, stall);
    __sync_fetch_and_add(&c->reclaim_count, 1);
    if (stall < RECLAIM_STALL_NS)
        return 0;
    struct acg_event *e = acg_reserve(EV_RECLAIM_STALL, cg, bpf_get_current_pid_tgid() >> 32);
    if (!e)
        return 0;
    e->value = stall;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    acg_submit(e, 1);
    return 0;
}

int acg_memory__vmscan__mm_vmscan_memcg_reclaim_begin(struct tracepoint__vmscan__mm_vmscan_memcg_reclaim_begin *args)
{
    return acg_reclaim_begin();
}

int acg_memory__vmscan__mm_vmscan_memcg_reclaim_end(struct tracepoint__vmscan__mm_vmscan_memcg_reclaim_end *args)
{
    return acg_reclaim_end();
}

int acg_memory__vmscan__mm_vmscan_direct_reclaim_begin(struct tracepoint__vmscan__mm_vmscan_direct_reclaim_begin *args)
{
    return acg_reclaim_begin();
}

int acg_memory__vmscan__mm_vmscan_direct_reclaim_end(struct tracepoint__vmscan__mm_vmscan_direct_reclaim_end *args)
{
    return acg_reclaim_end();
}

/* Runs in the OOM killer's context, not the victim's: the victim is found by pid. */
int acg_memory__oom__mark_victim(struct tracepoint__oom__mark_victim *args)
{
    u32 pid = args->pid;
    struct acg_task *t = tasks.lookup(&pid);
    if (!t)
        return 0;
    u64 cg = t->cgroup_id;
    struct acg_counters *c = counters.lookup(&cg);
    if (!c)
        return 0;
    __sync_fetch_and_add(&c->oom_kills, 1);
    struct acg_event *e = acg_reserve(EV_OOM_VICTIM, cg, pid);
    if (!e)
        return 0;
    e->ppid = t->ppid;
    e->value = (args->anon_rss + args->file_rss + args->shmem_rss) * 1024;  /* fields are in KiB */
    unsigned short off = args->data_loc_comm & 0xFFFF;
    bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), (void *)args + off);
    acg_submit(e, 1);
    return 0;
}
