/* Types shared by the agentcg BPF programs and mirrored, field for field, by
 * bpf/events.py (a test compares the sizes). Map sizes and thresholds come in as
 * -D defines from bpf/monitor.py; the defaults below only keep the file compilable. */
#ifndef AGENTCG_H
#define AGENTCG_H

#ifndef MAX_CGROUPS
#define MAX_CGROUPS 4096
#endif
#ifndef MAX_TASKS
#define MAX_TASKS 65536
#endif
#ifndef MAX_MMS
#define MAX_MMS 65536
#endif
#ifndef MAX_BLOCK_KEYS
#define MAX_BLOCK_KEYS 8192
#endif
#ifndef MAX_INFLIGHT_IO
#define MAX_INFLIGHT_IO 16384
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif
/* ring buffer: events are submitted without waking the reader (BPF_RB_NO_WAKEUP: a wake-up
 * costs the submitting task 15-20 us when a reader waits in epoll) except every this many;
 * urgent events (thresholds, OOM, stall, a process stopped at exec) wake it at once. The
 * reader polls with a timeout, so the rest arrive within one poll period. */
#ifndef WAKE_BATCH_EVENTS
#define WAKE_BATCH_EVENTS 64
#endif
#ifndef WAKE_AFTER_NS
#define WAKE_AFTER_NS 20000000ULL  /* an event waits unannounced at most this long if others follow */
#endif
#ifndef RECLAIM_STALL_NS
#define RECLAIM_STALL_NS 10000000ULL
#endif

/* cgroup:cgroup_rmdir `root` of the v2 (default) hierarchy */
#define V2_HIERARCHY_ID 0

#define HIST_SLOTS 32
/* devices a cgroup's block stats are found under without a map walk */
#define BLOCK_DEV_SLOTS 4
#define COMM_LEN 16
#define FILENAME_LEN 256

/* event kinds (ring buffer) */
#define EV_EXEC 1
#define EV_EXIT 2
#define EV_RSS_THRESHOLD 3
#define EV_OOM_VICTIM 4
#define EV_RECLAIM_STALL 5
#define EV_CGROUP_REMOVED 6

/* indices of the per-cpu `errors` array */
#define ERR_RINGBUF_FULL 0
#define ERR_TASKS_FULL 1
#define ERR_MMS_FULL 2
#define ERR_BLOCK_FULL 3
#define ERR_INFLIGHT_FULL 4
#define ERR_SLOTS 8

/* acg_watch.flags. WATCH_STOP_AT_EXEC: stop (SIGSTOP) each process that execs in the cgroup
 * until user space has moved it and sent SIGCONT, so no command escapes detection. */
#define WATCH_STOP_AT_EXEC 1

/* watched: cgroup id -> this; written by user space, `fired` also by the kernel */
struct acg_watch {
    __u64 rss_threshold_bytes; /* 0: no threshold */
    __u32 flags;
    __u32 fired;               /* threshold event sent; cleared when RSS falls below */
};

/* counters: cgroup id -> this; created by user space at watch time */
struct acg_counters {
    __s64 rss_bytes;
    __s64 rss_peak_bytes;
    __u64 page_faults;
    __u64 reclaim_ns;
    __u64 reclaim_count;
    __u64 cpu_ns;
    __u64 forks;
    __u64 threads;
    __u64 execs;
    __u64 exits;
    __u64 oom_kills;
    /* the first BLOCK_DEV_SLOTS devices block_stats has keys (cgroup, dev) for; user space
     * reads and deletes those keys directly. block_devs_more: more devices than slots
     * (user space then walks block_stats for this cgroup) */
    __u32 block_devs[BLOCK_DEV_SLOTS];
    __u32 block_devs_more;
    __u32 pad;
    /* sched concern: run-queue waits, slot i counts waits in [2^i, 2^(i+1)) ns. Here, not in
     * a map of its own, so charging a task at its exit is one lookup fewer (round 3) */
    __u64 runq_slots[HIST_SLOTS];
};

/* tasks: tid -> this. The sched concern keeps the task's own scheduler counters as of its
 * last switch-out (task_struct se.sum_exec_runtime, sched_info.run_delay and .pcount) and
 * charges the differences: CPU time, and run-queue waits, without a program on wakeups. */
struct acg_task {
    __u64 cgroup_id;
    __u32 ppid;    /* tgid of the parent that forked it, 0 if unknown */
    __u32 tgid;    /* its process (thread group), 0 if unknown */
    __u64 base_runtime_ns;
    __u64 base_run_delay_ns;
    __u64 base_pcount;
    __u32 has_base;  /* 1: the bases are the task's (a fork starts at 0); 0: take them next */
    __u32 flags;     /* TASK_EXIT_NOTED */
};

/* acg_task.flags of a process's leader (tid == tgid): `exits` may hold an entry for it, so
 * its exit looks there; without it (the common case) the exit program skips that lookup */
#define TASK_EXIT_NOTED 1

/* mms: mm_id (kmem:rss_stat) -> this. Sizes are the members' last reported values; the
 * cgroup is charged only what an mm gained after it was first seen there (size - base).
 * An mm that exec'd in the cgroup has bases 0; one that arrived with pages (a fork that
 * joined before exec, a moved process) has each base set at that member's first report,
 * so copy-on-write pages shared with a parent outside are not counted again. -1: unset. */
struct acg_mm {
    __u64 cgroup_id;
    __s64 file_bytes;
    __s64 anon_bytes;
    __s64 shmem_bytes;
    __s64 base_file_bytes;
    __s64 base_anon_bytes;
    __s64 base_shmem_bytes;
};

/* per-tid timestamps (run-queue wait, reclaim) and per-tgid exit status */
struct acg_stamp {
    __u64 cgroup_id;
    __u64 ns;
};

struct acg_exit {
    __u64 cgroup_id;
    __s32 exit_code;  /* -1: unknown */
    __s32 signal;     /* 0: none */
};

struct acg_blk_key {
    __u64 cgroup_id;
    __u32 dev;        /* kernel dev_t: major << 20 | minor */
    __u32 pad;
};

struct acg_blk_stats {
    __u64 read_bytes;
    __u64 write_bytes;
    __u64 read_ios;
    __u64 write_ios;
    __u64 read_latency_ns;
    __u64 write_latency_ns;
};

struct acg_io_key {
    __u64 sector;
    __u32 dev;
    __u32 pad;
};

struct acg_io {
    __u64 cgroup_id;
    __u64 issue_ns;
    __u32 bytes;
    __u32 write;
};

/* the one ring-buffer record; `value`/`aux` depend on `kind`:
 * EV_RSS_THRESHOLD: rss bytes / threshold bytes; EV_RECLAIM_STALL: stall ns / 0 */
struct acg_event {
    __u64 ktime_ns;
    __u64 cgroup_id;
    __u64 value;
    __u64 aux;
    __u32 kind;
    __u32 pid;
    __u32 ppid;
    __s32 exit_code;
    __s32 signal;
    __u32 pad;
    char comm[COMM_LEN];
    char filename[FILENAME_LEN];
};

#endif
