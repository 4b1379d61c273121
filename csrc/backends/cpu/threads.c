/* How many threads the CPU kernels use.
 *
 * The default is the number of physical cores among the CPUs this process may run on (its
 * affinity mask, so taskset, cgroups' cpusets and container limits count): a second hardware
 * thread on a core adds no memory bandwidth, which is what decode is bound by, and makes the
 * OpenMP team wait on the slower sibling. OMP_NUM_THREADS, when set, wins over that default.
 *
 * OpenMP keeps the team size per calling thread (the nthreads ICV): the backend's enter applies
 * the model's count (its `threads` option, else this default) on the thread that calls into the
 * model, so generate_stream's worker thread gets it too, and oneDNN, which sizes its parallel
 * regions from the same ICV, follows along. The automatic default also looks, at each call and
 * each decode step, at how much other work is runnable (xo_cpu_team). */
#include <ctype.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <omp.h>

#include "backends/cpu/kernels.h"

static int g_default_threads = 0;   /* 0: not chosen yet */
static int g_default_chosen = 0;    /* 1: set by the user (set_num_threads or OMP_NUM_THREADS) */
static int g_cores = 0;             /* physical cores, counted once */

/* one "package:core" key per physical core; -1 when sysfs does not say */
static long core_key(int cpu) {
    char path[128];
    long core = -1, package = 0;
    snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/core_id", cpu);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    if (fscanf(f, "%ld", &core) != 1) core = -1;
    fclose(f);
    snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/physical_package_id", cpu);
    if ((f = fopen(path, "r"))) {
        if (fscanf(f, "%ld", &package) != 1) package = 0;
        fclose(f);
    }
    return core < 0 ? -1 : package * 65536 + core;
}

int xo_cpu_physical_cores(void) {
    cpu_set_t mask;
    CPU_ZERO(&mask);
    if (sched_getaffinity(0, sizeof mask, &mask) != 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        return n > 0 ? (int)n : 1;
    }
    const int allowed = CPU_COUNT(&mask);
    long keys[CPU_SETSIZE];
    int cores = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (!CPU_ISSET(cpu, &mask)) continue;
        long k = core_key(cpu);
        if (k < 0) return allowed > 0 ? allowed : 1;   /* no topology: count the CPUs */
        int seen = 0;
        for (int i = 0; i < cores && !seen; i++) seen = keys[i] == k;
        if (!seen) keys[cores++] = k;
    }
    return cores > 0 ? cores : 1;
}

int xo_cpu_default_threads(void) {
    int n = __atomic_load_n(&g_default_threads, __ATOMIC_RELAXED);
    if (n > 0) return n;
    const char *env = getenv("OMP_NUM_THREADS");
    /* libgomp parsed the variable (a list: its first entry is the outer team) */
    const int from_env = env && isdigit((unsigned char)env[0]);
    n = from_env ? omp_get_max_threads() : xo_cpu_physical_cores();
    if (n < 1) n = 1;
    if (from_env) __atomic_store_n(&g_default_chosen, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&g_default_threads, n, __ATOMIC_RELAXED);
    return n;
}

xo_status xo_cpu_check_threads(long long n) {
    if (n == LLONG_MAX || n == LLONG_MIN)   /* what a caller passes for a number beyond 64 bits */
        return xo_fail(XO_EINVAL, "the thread count must be between 1 and %d, got a number beyond 64 bits",
                       XO_CPU_MAX_THREADS);
    if (n < 1 || n > XO_CPU_MAX_THREADS)
        return xo_fail(XO_EINVAL, "the thread count must be between 1 and %d, got %lld", XO_CPU_MAX_THREADS, n);
    return XO_OK;
}

xo_status xo_cpu_set_default_threads(long long n) {
    XO_TRY(xo_cpu_check_threads(n));
    __atomic_store_n(&g_default_threads, (int)n, __ATOMIC_RELAXED);
    __atomic_store_n(&g_default_chosen, 1, __ATOMIC_RELAXED);
    return XO_OK;
}

/* Runnable tasks on the machine right now (the kernel's count in /proc/loadavg, this caller
 * included), or 0 when it cannot be read. Asked once per decode step: the file stays open and
 * is read again from its start (one system call, no stdio). */
static int g_loadavg_fd = -2;   /* -2: not opened yet; -1: cannot be opened */

long xo_cpu_runnable_now(void) {
    int fd = __atomic_load_n(&g_loadavg_fd, __ATOMIC_ACQUIRE);
    if (fd == -2) {
        int opened = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
        int expected = -2;
        if (!__atomic_compare_exchange_n(&g_loadavg_fd, &expected, opened < 0 ? -1 : opened, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE)) {
            if (opened >= 0) close(opened);   /* another thread opened it first */
        }
        fd = __atomic_load_n(&g_loadavg_fd, __ATOMIC_ACQUIRE);
    }
    if (fd < 0) return 0;
    char buf[128];
    const ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return 0;
    buf[n] = '\0';
    /* "l1 l5 l15 running/total last_pid": the fourth field's numerator */
    const char *p = buf;
    for (int field = 0; field < 3; field++) {
        while (*p && *p != ' ') p++;
        while (*p == ' ') p++;
    }
    long running = 0;
    if (!isdigit((unsigned char)*p)) return 0;
    while (isdigit((unsigned char)*p)) running = running * 10 + (*p++ - '0');
    return *p == '/' ? running : 0;
}

/* The automatic default gives way to other work: each other runnable task takes a core first,
 * so that no thread of a team is pushed off its core and the team never waits for it (a team
 * of one waits for nobody). A count the user chose is used as it is. */
int xo_cpu_team(const xo_cpu_ctx *cx) {
    if (cx->threads > 0) return cx->threads;
    const int n = xo_cpu_default_threads();
    if (__atomic_load_n(&g_default_chosen, __ATOMIC_RELAXED)) return n;
    int cores = __atomic_load_n(&g_cores, __ATOMIC_RELAXED);
    if (!cores) __atomic_store_n(&g_cores, cores = xo_cpu_physical_cores(), __ATOMIC_RELAXED);
    const long others = xo_cpu_runnable_now() - 1;
    const long free_cores = others > 0 ? cores - others : n;
    return free_cores < 1 ? 1 : free_cores < n ? (int)free_cores : n;
}

/* Signals and oneDNN's JIT sgemm. oneDNN's generated f32 GEMM kernels (3.2 here; fixed
 * upstream in oneDNN 3.11, uxlfoundation/oneDNN#4845) point rsp at a heap workspace while they
 * run. A signal handled on such a thread has the kernel push its frame (several KB with the
 * AVX-512 state) below that pointer: over the heap chunk before the workspace, which glibc
 * later reports as "corrupted size vs. prev_size" and the like. SIGINT arrives during a long
 * call by design (Ctrl-C, python/sigint.c), on whichever thread Linux picks: the caller or
 * any thread of the OpenMP team. So:
 *   - the team's other threads block every asynchronous signal (Linux then hands a
 *     process-wide signal to another thread; nothing of theirs needs one);
 *   - the calling thread, which must still take Ctrl-C, gets an alternate signal stack:
 *     handlers installed with SA_ONSTACK (Python's, and ours in front of it) then run there,
 *     whatever rsp points at. */
enum { ALT_STACK_BYTES = 256 * 1024 };

static pthread_key_t g_alt_key;
static pthread_once_t g_alt_once = PTHREAD_ONCE_INIT;
static _Thread_local int t_guarded;   /* 1: this thread's signals are set up (blocked or alt stack) */

/* at the exit of a thread that got our alternate stack: stop using it, then free it */
static void alt_stack_free(void *mem) {
    stack_t cur;
    if (sigaltstack(NULL, &cur) == 0 && cur.ss_sp == mem && !(cur.ss_flags & SS_ONSTACK)) {
        stack_t off = { .ss_flags = SS_DISABLE };
        sigaltstack(&off, NULL);
    }
    free(mem);
}

static void alt_key_create(void) {
    if (pthread_key_create(&g_alt_key, alt_stack_free) != 0) g_alt_key = (pthread_key_t)-1;
}

static void guard_caller(void) {
    stack_t cur;
    if (sigaltstack(NULL, &cur) != 0) return;
    t_guarded = 1;
    if (!(cur.ss_flags & SS_DISABLE)) return;   /* the thread has one already (faulthandler's, say) */
    pthread_once(&g_alt_once, alt_key_create);
    if (g_alt_key == (pthread_key_t)-1) return;
    long min = sysconf(_SC_MINSIGSTKSZ);
    size_t bytes = min > 0 && (size_t)min * 4 > ALT_STACK_BYTES ? (size_t)min * 4 : ALT_STACK_BYTES;
    void *mem = malloc(bytes);
    if (!mem) { t_guarded = 0; return; }
    stack_t ss = { .ss_sp = mem, .ss_size = bytes, .ss_flags = 0 };
    if (sigaltstack(&ss, NULL) != 0 || pthread_setspecific(g_alt_key, mem) != 0) {
        stack_t off = { .ss_flags = SS_DISABLE };
        sigaltstack(&off, NULL);
        free(mem);
        t_guarded = 0;
    }
}

static void guard_worker(void) {
    sigset_t all;
    sigfillset(&all);
    /* faults stay deliverable */
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    sigdelset(&all, SIGTRAP);
    sigdelset(&all, SIGABRT);
    if (pthread_sigmask(SIG_BLOCK, &all, NULL) == 0) t_guarded = 1;
}

void xo_cpu_guard_signals(const xo_cpu_ctx *cx) {
    if (!t_guarded) guard_caller();
    /* every thread a team of this call may use: the count asked for, else the default (the
     * largest team xo_cpu_team gives); a team uses the first threads of the caller's pool */
    const int most = cx->threads > 0 ? cx->threads : xo_cpu_default_threads();
    #pragma omp parallel num_threads(most) if (most > 1)
    {
        if (omp_get_thread_num() != 0 && !t_guarded) guard_worker();
    }
}
