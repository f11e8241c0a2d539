/* The shim's gated fork, in C: the command's process from fork to exec.
 *
 * worker/shim.py forks the command early (so the worker can record its pid with the
 * ASSIGNED -> RUNNING transition) and holds it at a gate until the worker says go. Done in
 * Python, that child runs interpreter code between fork and exec, and every object it
 * touches copies a page of the shim's memory: 350 page faults and 1.55 ms of CPU in the
 * child against 63 and 0.77 ms here, ~0.5 ms of CPU per job less in all (BENCHMARKS.md,
 * "the shim's gate"). Here the child runs only this function until exec.
 *
 * It does exactly what shim.Shim.child_side does, in the same order, and fails the same
 * way; the shim falls back to that Python code where this library is not built.
 * Built by scripts/bootstrap:  cc -O2 -shared -fPIC -o libgpulab_gate.so gate.c
 *
 * Everything the child needs is prepared by the caller before the fork (argv and envp as
 * NUL-terminated byte strings, the PATH candidates already joined, the error prefix already
 * formatted): after fork the child allocates nothing and touches only its own stack.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#define CHILD_GAVE_UP 127

static void write_all(int fd, const char *data, size_t size) {
    while (size > 0) {
        ssize_t n = write(fd, data, size);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        data += n;
        size -= (size_t)n;
    }
}

/* The child: never returns. */
static void child(int gate_r, int gate_w, int err_r, int err_w, pid_t shim_pid, char *const candidates[],
                  char *const argv[], char *const envp[], const char *err_prefix, size_t err_prefix_size,
                  const int reset_signals[], int n_reset) {
    close(gate_w);
    close(err_r);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    for (int i = 0; i < n_reset; i++)
        sigaction(reset_signals[i], &dfl, NULL);
    setsid();
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (getppid() != shim_pid)
        _exit(CHILD_GAVE_UP); /* the shim is already gone */
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (devnull >= 0) {
        dup2(devnull, 0); /* dup2 clears close-on-exec on fd 0 */
        close(devnull);
    }
    char go = 0;
    ssize_t n;
    do {
        n = read(gate_r, &go, 1);
    } while (n < 0 && errno == EINTR);
    if (n != 1 || go != 'g')
        _exit(CHILD_GAVE_UP);
    /* os.execvpe's search: the first error other than "not there" wins, else the last one. */
    int saved = 0, last = ENOENT;
    for (int i = 0; candidates[i] != NULL; i++) {
        execve(candidates[i], argv, envp);
        last = errno;
        if (last != ENOENT && last != ENOTDIR && saved == 0)
            saved = last;
    }
    const char *why = strerror(saved ? saved : last);
    char message[2000];
    size_t size = err_prefix_size < sizeof message ? err_prefix_size : sizeof message;
    memcpy(message, err_prefix, size);
    size_t why_size = strlen(why);
    if (why_size > sizeof message - size)
        why_size = sizeof message - size;
    memcpy(message + size, why, why_size);
    write_all(err_w, message, size + why_size);
    _exit(CHILD_GAVE_UP);
}

/* Fork the command's process, held at the gate (see child()). Returns its pid, or -errno. */
pid_t gpulab_fork_gated(int gate_r, int gate_w, int err_r, int err_w, pid_t shim_pid, char *const candidates[],
                        char *const argv[], char *const envp[], const char *err_prefix, size_t err_prefix_size,
                        const int reset_signals[], int n_reset) {
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0)
        child(gate_r, gate_w, err_r, err_w, shim_pid, candidates, argv, envp, err_prefix, err_prefix_size,
              reset_signals, n_reset);
    return pid;
}
