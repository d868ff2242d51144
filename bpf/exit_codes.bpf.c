/* exit_codes (opt-in, needs "process"): the status a process passes to exit_group(2).
 * Off by default: a syscall tracepoint sets TIF_SYSCALL_TRACEPOINT on every task, which
 * moves every system call on the host onto the slow entry path (benchmark (3)). */
#include "agentcg.h"

int acg_exit_codes__syscalls__sys_enter_exit_group(struct tracepoint__syscalls__sys_enter_exit_group *args)
{
    u64 cg;
    if (!acg_current(&cg))
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct acg_exit x = {.cgroup_id = cg, .exit_code = args->error_code & 0xff, .signal = 0};
    exits.update(&tgid, &x);
    return 0;
}
