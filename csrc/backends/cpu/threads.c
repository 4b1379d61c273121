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
#include <limits.h>
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
 * included), or 0 when it cannot be read. */
static long runnable_now(void) {
    FILE *f = fopen("/proc/loadavg", "r");
    if (!f) return 0;
    double l1, l5, l15;
    long running = 0, total = 0;
    if (fscanf(f, "%lf %lf %lf %ld/%ld", &l1, &l5, &l15, &running, &total) != 5) running = 0;
    fclose(f);
    return running;
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
    const long others = runnable_now() - 1;
    const long free_cores = others > 0 ? cores - others : n;
    return free_cores < 1 ? 1 : free_cores < n ? (int)free_cores : n;
}
