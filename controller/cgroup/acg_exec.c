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
 * (`bash scripts/host.sh setup`); small and static so its own exec costs little.
 *
 *     agentcg-exec park CTRL_FD JOIN_FD[,JOIN_FD...]
 *
 * Park mode (controller/cgroup/parked.py): join the cgroups now, write "R" on CTRL_FD (a
 * Unix stream socket; "J <errno>" if a join failed), then wait there for one request:
 * a header of three uint32 (argument count, environment count, payload bytes) with three
 * fds (stdin, stdout, stderr) as SCM_RIGHTS, then the payload: CWD PATH ARG... ENV...,
 * each NUL-terminated (CWD empty: stay). It puts the fds on 0, 1, 2 and execve's PATH;
 * CTRL_FD is close-on-exec, so the parent reads end-of-file when the program runs, or
 * "E <errno>". The joins (and the RCU grace period a v1 cgroup migration waits for) so
 * happen before the tool call, not in it. It dies with the thread that parked it
 * (PR_SET_PDEATHSIG, cleared before the exec) or when CTRL_FD reads end-of-file. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

static void report(int fd, char what, int err)
{
    char buf[32];
    int n = snprintf(buf, sizeof(buf), "%c %d", what, err);
    if (n > 0 && write(fd, buf, (size_t)n) < 0)
        _exit(125);
}

static int join_all(char *list)
{
    for (char *p = list; *p;) {
        char *end;
        long fd = strtol(p, &end, 10);
        if (end == p)
            break;
        if (write((int)fd, "0", 1) != 1)
            return errno;
        close((int)fd);
        p = *end == ',' ? end + 1 : end;
    }
    return 0;
}

static int read_full(int fd, char *buf, size_t n)
{
    while (n > 0) {
        ssize_t got = read(fd, buf, n);
        if (got <= 0)
            return -1;
        buf += got;
        n -= (size_t)got;
    }
    return 0;
}

static int park(int ctrl, char *joins)
{
    fcntl(ctrl, F_SETFD, FD_CLOEXEC);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int err = join_all(joins);
    if (err) {
        report(ctrl, 'J', err);
        _exit(126);
    }
    if (write(ctrl, "R", 1) != 1)
        _exit(125);
    uint32_t head[3];
    int fds[3];
    char control[CMSG_SPACE(sizeof(fds))];
    struct iovec iov = {head, sizeof(head)};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    ssize_t got = recvmsg(ctrl, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    if (got != (ssize_t)sizeof(head))
        _exit(0);                       /* the parent closed (or died): nothing to run */
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (c == NULL || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(sizeof(fds)))
        _exit(125);
    memcpy(fds, CMSG_DATA(c), sizeof(fds));
    uint32_t nargs = head[0], nenv = head[1], size = head[2];
    if (nargs < 1 || nargs > 1u << 20 || nenv > 1u << 20 || size > 64u << 20)
        _exit(125);
    char *payload = malloc((size_t)size + 1);
    char **args = calloc((size_t)nargs + 1, sizeof(char *));
    char **envp = calloc((size_t)nenv + 1, sizeof(char *));
    if (payload == NULL || args == NULL || envp == NULL || read_full(ctrl, payload, size) != 0)
        _exit(125);
    payload[size] = 0;
    char *p = payload, *stop = payload + size;
    char *cwd = p;
    p += strlen(p) + 1;
    char *path = p < stop ? p : NULL;
    if (path == NULL)
        _exit(125);
    p += strlen(p) + 1;
    for (uint32_t i = 0; i < nargs; i++) {
        if (p >= stop)
            _exit(125);
        args[i] = p;
        p += strlen(p) + 1;
    }
    for (uint32_t i = 0; i < nenv; i++) {
        if (p >= stop)
            _exit(125);
        envp[i] = p;
        p += strlen(p) + 1;
    }
    for (int i = 0; i < 3; i++) {
        if (dup2(fds[i], i) < 0) {
            report(ctrl, 'E', errno);
            _exit(127);
        }
    }
    for (int i = 0; i < 3; i++)
        if (fds[i] > 2 && (i == 0 || fds[i] != fds[i - 1]) && (i < 2 || fds[i] != fds[0]))
            close(fds[i]);
    if (*cwd && chdir(cwd) != 0) {
        report(ctrl, 'E', errno);
        _exit(127);
    }
    prctl(PR_SET_PDEATHSIG, 0);         /* the program must not die with our parent's thread */
    execve(path, args, envp);
    report(ctrl, 'E', errno);
    _exit(127);
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "park") == 0)
        return park(atoi(argv[2]), argv[3]);
    if (argc < 6 || strcmp(argv[3], "--") != 0) {
        static const char usage[] = "usage: agentcg-exec STATUS_FD JOIN_FD[,JOIN_FD...] -- PATH ARGV0 [ARG...]\n";
        if (write(2, usage, sizeof(usage) - 1) < 0)
            return 2;
        return 2;
    }
    int status_fd = atoi(argv[1]);
    fcntl(status_fd, F_SETFD, FD_CLOEXEC);
    int err = join_all(argv[2]);
    if (err) {
        report(status_fd, 'J', err);
        _exit(126);
    }
    execv(argv[4], argv + 5);
    report(status_fd, 'E', errno);
    _exit(127);
}
