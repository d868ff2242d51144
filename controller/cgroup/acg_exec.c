/* agentcg-exec: join cgroups, then exec; the exec helper of controller/cgroup/spawner.py.
 *
 *     agentcg-exec STATUS_FD JOIN_FD[,JOIN_FD...] -- PATH ARGV0 [ARG...]
 *
 * The parent spawns this with vfork/posix_spawn semantics (Python's subprocess without a
 * preexec_fn), passing the open cgroup.procs files of the call's cgroup, one per
 * hierarchy. It writes "0" (itself) into each, so PROGRAM's first instruction already
 * runs inside every hierarchy, then execve's PATH (resolved by the parent, as subprocess
 * does: no PATH search here, and no /bin/sh retry on ENOEXEC as execvp would) with argv
 * ARGV0 ARG...; PROGRAM below means that. STATUS_FD is
 * close-on-exec: the parent reads end-of-file when PROGRAM runs, or "J <errno>" (a join
 * failed, nothing ran) / "E <errno>" (the exec failed). Built at setup time
 * (`bash scripts/host.sh setup`); small and static so its own exec costs little. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void report(int fd, char what, int err)
{
    char buf[32];
    int n = snprintf(buf, sizeof(buf), "%c %d", what, err);
    if (n > 0 && write(fd, buf, (size_t)n) < 0)
        _exit(125);
}

int main(int argc, char **argv)
{
    if (argc < 6 || strcmp(argv[3], "--") != 0) {
        static const char usage[] = "usage: agentcg-exec STATUS_FD JOIN_FD[,JOIN_FD...] -- PATH ARGV0 [ARG...]\n";
        if (write(2, usage, sizeof(usage) - 1) < 0)
            return 2;
        return 2;
    }
    int status_fd = atoi(argv[1]);
    fcntl(status_fd, F_SETFD, FD_CLOEXEC);
    for (char *p = argv[2]; *p;) {
        char *end;
        long fd = strtol(p, &end, 10);
        if (end == p)
            break;
        if (write((int)fd, "0", 1) != 1) {
            report(status_fd, 'J', errno);
            _exit(126);
        }
        close((int)fd);
        p = *end == ',' ? end + 1 : end;
    }
    execv(argv[4], argv + 5);
    report(status_fd, 'E', errno);
    _exit(127);
}
