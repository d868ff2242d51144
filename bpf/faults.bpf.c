/* faults (opt-in, needs "process"): per-cgroup RSS (current, peak, threshold crossing)
 * from kmem:rss_stat and user page faults from exceptions:page_fault_user. Both fire on
 * every page fault on the host (hundreds of thousands a second under fork- or
 * allocation-heavy work), which is why they are not loaded by default: where a call has
 * its own memory cgroup the kernel's counters say the same (tests/bpf/test_faults.py says
 * by how much). For hosts or cgroups where the kernel cannot account per call. */
#include "agentcg.h"

/* mm counter members (include/linux/mm_types_task.h, unchanged 4.x..6.18) */
#define MM_FILEPAGES 0
#define MM_ANONPAGES 1
#define MM_SHMEMPAGES 3

BPF_TABLE("lru_hash", u32, struct acg_mm, mms, MAX_MMS);

/* what a member adds to the cgroup: its growth above the base (nothing while unset) */
static __always_inline s64 acg_above(s64 size, s64 base)
{
    if (base < 0 || size <= base)
        return 0;
    return size - base;
}

static __always_inline s64 acg_mm_counted(struct acg_mm *m)
{
    return acg_above(m->file_bytes, m->base_file_bytes) + acg_above(m->anon_bytes, m->base_anon_bytes) +
           acg_above(m->shmem_bytes, m->base_shmem_bytes);
}

static __always_inline void acg_rss_add(u64 cg, s64 delta)
{
    struct acg_counters *c = counters.lookup(&cg);
    struct acg_watch *w = watched.lookup(&cg);
    if (!c || !w)
        return;
    __sync_fetch_and_add(&c->rss_bytes, delta);
    s64 rss = c->rss_bytes;
    if (rss > c->rss_peak_bytes)
        c->rss_peak_bytes = rss;  /* a racing CPU may lower it by a few pages; peaks are coarse */
    u64 limit = w->rss_threshold_bytes;
    if (!limit)
        return;
    if (rss >= 0 && (u64)rss >= limit) {
        if (w->fired)
            return;
        w->fired = 1;
        struct acg_event *e = acg_reserve(EV_RSS_THRESHOLD, cg, bpf_get_current_pid_tgid() >> 32);
        if (!e)
            return;
        e->value = rss;
        e->aux = limit;
        bpf_get_current_comm(e->comm, sizeof(e->comm));
        acg_submit(e, 1);
    } else if (w->fired && (rss < 0 || (u64)rss < limit - (limit >> 3))) {
        /* re-armed once RSS is clearly below (7/8 of the threshold), so RSS wobbling
         * around the line is one crossing, not several */
        w->fired = 0;
    }
}

/* `size` is the member's absolute value in bytes; the mm is charged to the cgroup of the
 * task that last touched it as its own (curr=1), so a process moved to another cgroup
 * takes its RSS along. */
int acg_faults__kmem__rss_stat(struct tracepoint__kmem__rss_stat *args)
{
    int member = args->member;
    if (member != MM_FILEPAGES && member != MM_ANONPAGES && member != MM_SHMEMPAGES)
        return 0;
    u32 mm_id = args->mm_id;
    s64 size = args->size;
    struct acg_mm *m = mms.lookup(&mm_id);
    if (args->curr) {
        u64 cg = bpf_get_current_cgroup_id();
        if (!m) {
            if (!watched.lookup(&cg))
                return 0;
            u32 tid = bpf_get_current_pid_tgid();
            struct acg_stamp *f = mm_fresh.lookup(&tid);
            s64 base = (f && f->cgroup_id == cg) ? 0 : -1;
            if (f)
                mm_fresh.delete(&tid);
            struct acg_mm fresh = {.cgroup_id = cg, .base_file_bytes = base, .base_anon_bytes = base,
                                   .base_shmem_bytes = base};
            if (mms.update(&mm_id, &fresh)) {
                acg_error(ERR_MMS_FULL);
                return 0;
            }
            m = mms.lookup(&mm_id);
            if (!m)
                return 0;
        } else if (m->cgroup_id != cg) {
            s64 total = acg_mm_counted(m);
            acg_rss_add(m->cgroup_id, -total);
            m->cgroup_id = cg;
            acg_rss_add(cg, total);
        }
    } else if (!m) {
        return 0;
    }
    s64 before, after;
    if (member == MM_FILEPAGES) {
        before = acg_above(m->file_bytes, m->base_file_bytes);
        if (m->base_file_bytes < 0)
            m->base_file_bytes = size;
        m->file_bytes = size;
        after = acg_above(size, m->base_file_bytes);
    } else if (member == MM_ANONPAGES) {
        before = acg_above(m->anon_bytes, m->base_anon_bytes);
        if (m->base_anon_bytes < 0)
            m->base_anon_bytes = size;
        m->anon_bytes = size;
        after = acg_above(size, m->base_anon_bytes);
    } else {
        before = acg_above(m->shmem_bytes, m->base_shmem_bytes);
        if (m->base_shmem_bytes < 0)
            m->base_shmem_bytes = size;
        m->shmem_bytes = size;
        after = acg_above(size, m->base_shmem_bytes);
    }
    s64 delta = after - before;
    u64 cg = m->cgroup_id;
    if (m->file_bytes == 0 && m->anon_bytes == 0 && m->shmem_bytes == 0)
        mms.delete(&mm_id);  /* torn down at exit (or emptied) */
    if (delta)
        acg_rss_add(cg, delta);
    return 0;
}

/* page_fault_user(unsigned long address, struct pt_regs *regs, unsigned long error_code) */
int acg_faults__exceptions__page_fault_user(struct bpf_raw_tracepoint_args *ctx)
{
    u64 cg;
    struct acg_counters *c = acg_current(&cg);
    if (c)
        __sync_fetch_and_add(&c->page_faults, 1);
    return 0;
}
