/* block: bytes and latency per (cgroup, device). Completions run in whatever context the
 * interrupt lands in, and a request may be issued from a kblockd worker, so a request is
 * charged to the task that queued its first bio (block_bio_queue runs in its context). */
#include "agentcg.h"

BPF_TABLE("lru_hash", struct acg_io_key, struct acg_io, io_inflight, MAX_INFLIGHT_IO);
BPF_TABLE("lru_hash", struct acg_blk_key, struct acg_blk_stats, block_stats, MAX_BLOCK_KEYS);
/* bios merged into a request behind its first one are never issued under their own
 * sector: LRU keeps those leftovers bounded */
BPF_TABLE("lru_hash", struct acg_io_key, struct acg_stamp, io_owner, MAX_INFLIGHT_IO);

/* Notes a device the cgroup now has block stats for, so user space reads and deletes its
 * keys without walking block_stats. Two CPUs adding a cgroup's first two devices in the
 * same instant can both take one empty slot: that device is then missing from counters()
 * and its key ages out of the LRU map; nothing else is affected. */
static __always_inline void acg_note_device(struct acg_counters *c, u32 dev)
{
#pragma unroll
    for (int i = 0; i < BLOCK_DEV_SLOTS; i++) {
        if (c->block_devs[i] == dev)
            return;
        if (c->block_devs[i] == 0) {
            c->block_devs[i] = dev;
            return;
        }
    }
    c->block_devs_more = 1;
}

int acg_block__block__block_bio_queue(struct tracepoint__block__block_bio_queue *args)
{
    u64 cg;
    if (!acg_current(&cg))
        return 0;
    struct acg_io_key key = {.sector = args->sector, .dev = args->dev};
    struct acg_stamp owner = {.cgroup_id = cg, .ns = 0};
    io_owner.update(&key, &owner);
    return 0;
}

int acg_block__block__block_rq_issue(struct tracepoint__block__block_rq_issue *args)
{
    if (args->bytes == 0)
        return 0;
    struct acg_io_key key = {.sector = args->sector, .dev = args->dev};
    u64 cg = bpf_get_current_cgroup_id();
    struct acg_stamp *owner = io_owner.lookup(&key);
    if (owner) {
        cg = owner->cgroup_id;
        io_owner.delete(&key);
    }
    if (!acg_counters_of(cg))
        return 0;
    /* rwbs: an optional 'F' (preflush), then the operation R/W/D/E/N, then flags */
    char op = args->rwbs[0] == 'F' ? args->rwbs[1] : args->rwbs[0];
    if (op != 'R' && op != 'W')
        return 0;
    struct acg_io io = {.cgroup_id = cg, .issue_ns = bpf_ktime_get_ns(),
                        .bytes = args->bytes, .write = op == 'W'};
    if (io_inflight.update(&key, &io))
        acg_error(ERR_INFLIGHT_FULL);
    return 0;
}

int acg_block__block__block_rq_complete(struct tracepoint__block__block_rq_complete *args)
{
    struct acg_io_key key = {.sector = args->sector, .dev = args->dev};
    struct acg_io *io = io_inflight.lookup(&key);
    if (!io)
        return 0;
    u64 latency = bpf_ktime_get_ns() - io->issue_ns;
    struct acg_blk_key bk = {.cgroup_id = io->cgroup_id, .dev = args->dev};
    u64 bytes = io->bytes;
    u32 write = io->write;
    io_inflight.delete(&key);
    struct acg_counters *c = acg_counters_of(bk.cgroup_id);
    if (!c)
        return 0;
    struct acg_blk_stats *st = block_stats.lookup(&bk);
    if (!st) {
        struct acg_blk_stats zero = {};
        if (block_stats.insert(&bk, &zero) == 0)
            acg_note_device(c, args->dev);
        st = block_stats.lookup(&bk);
        if (!st) {
            acg_error(ERR_BLOCK_FULL);
            return 0;
        }
        st = block_stats.lookup(&bk);
        if (!st)
            return 0;
    }
    if (write) {
        __sync_fetch_and_add(&st->write_bytes, bytes);
        __sync_fetch_and_add(&st->write_ios, 1);
        __sync_fetch_and_add(&st->write_latency_ns, latency);
    } else {
        __sync_fetch_and_add(&st->read_bytes, bytes);
        __sync_fetch_and_add(&st->read_ios, 1);
        __sync_fetch_and_add(&st->read_latency_ns, latency);
    }
    return 0;
}
