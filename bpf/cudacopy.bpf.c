// Uprobes on the CUDA copy entry points of one process: calls and bytes per API and direction.
//
// Settings come in as -D defines from bpf/cudacopy.py: TARGET_TGID (the traced process),
// N_APIS and N_DIRS (the table's shape; the API indices are the order of cudacopy.APIS).
// Only the entry is probed: the call is counted whether or not it succeeds (without a GPU
// every call fails, which is how the tests see it).
#include <uapi/linux/ptrace.h>

#define DIR_H2H 0
#define DIR_H2D 1
#define DIR_D2H 2
#define DIR_D2D 3
#define DIR_DEFAULT 4   /* cudaMemcpyDefault / cuMemcpyAsync: direction inferred from UVA */
#define DIR_OTHER 5     /* a kind value the runtime would reject */

struct copy_stat {
    u64 calls;
    u64 bytes;
};

BPF_ARRAY(copy_stats, struct copy_stat, N_APIS * N_DIRS);

static __always_inline int count_copy(u32 api, u64 dir, u64 bytes)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid != TARGET_TGID)
        return 0;
    if (dir > DIR_DEFAULT)
        dir = DIR_OTHER;
    u32 key = api * N_DIRS + (u32)dir;
    struct copy_stat *stat = copy_stats.lookup(&key);
    if (!stat)
        return 0;
    __sync_fetch_and_add(&stat->calls, 1);
    __sync_fetch_and_add(&stat->bytes, bytes);
    return 0;
}

// cudaMemcpy(dst, src, count, kind) and cudaMemcpyAsync(dst, src, count, kind, stream)
int on_cuda_memcpy(struct pt_regs *ctx) { return count_copy(0, PT_REGS_PARM4(ctx), PT_REGS_PARM3(ctx)); }
int on_cuda_memcpy_async(struct pt_regs *ctx) { return count_copy(1, PT_REGS_PARM4(ctx), PT_REGS_PARM3(ctx)); }
// cuMemcpy{HtoD,DtoH,DtoD}[Async]_v2(dst, src, bytes[, stream]) and cuMemcpyAsync(dst, src, bytes, stream)
int on_cu_htod(struct pt_regs *ctx) { return count_copy(2, DIR_H2D, PT_REGS_PARM3(ctx)); }
int on_cu_dtoh(struct pt_regs *ctx) { return count_copy(3, DIR_D2H, PT_REGS_PARM3(ctx)); }
int on_cu_htod_async(struct pt_regs *ctx) { return count_copy(4, DIR_H2D, PT_REGS_PARM3(ctx)); }
int on_cu_dtoh_async(struct pt_regs *ctx) { return count_copy(5, DIR_D2H, PT_REGS_PARM3(ctx)); }
int on_cu_dtod_async(struct pt_regs *ctx) { return count_copy(6, DIR_D2D, PT_REGS_PARM3(ctx)); }
int on_cu_memcpy_async(struct pt_regs *ctx) { return count_copy(7, DIR_DEFAULT, PT_REGS_PARM3(ctx)); }
