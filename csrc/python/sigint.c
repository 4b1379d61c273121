/* Ctrl-C during a long call. Python runs its SIGINT handler only between bytecodes, so a C
 * loop running with the GIL released would not see Ctrl-C until it ends. A handler chained
 * in front of Python's bumps a counter that the C loops poll (engine/interrupt.h), then lets
 * Python's handler record the signal as usual; the binding turns the early stop into the
 * KeyboardInterrupt that Python's handler raises. */
#include "python/binding.h"

#include <errno.h>
#include <signal.h>
#include <string.h>

static atomic_uint sigint_count;
static struct sigaction python_action;  /* the handler ours was put in front of */
static unsigned long main_thread;
static PyObject *getsignal, *default_int_handler;

static void on_sigint(int sig, siginfo_t *info, void *context) {
    const int saved_errno = errno;
    /* Python's first, so that the call that stops on the count finds the signal recorded */
    if (python_action.sa_flags & SA_SIGINFO)
        python_action.sa_sigaction(sig, info, context);
    else
        python_action.sa_handler(sig);
    atomic_fetch_add_explicit(&sigint_count, 1, memory_order_release);
    errno = saved_errno;
}

/* Puts on_sigint in front of the installed handler unless it already is. 0: in place. */
static int chain_handler(void) {
    struct sigaction cur;
    if (sigaction(SIGINT, NULL, &cur) != 0) return -1;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigint) return 0;
    /* chaining to SIG_DFL or SIG_IGN would change what Ctrl-C does */
    if (!(cur.sa_flags & SA_SIGINFO) && (cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN)) return -1;
    python_action = cur;
    struct sigaction ours = cur;
    /* SA_ONSTACK: on the alternate stack the CPU backend gives a calling thread (threads.c:
     * oneDNN's sgemm points rsp at the heap while it runs) */
    ours.sa_flags = (cur.sa_flags | SA_SIGINFO | SA_ONSTACK) & ~SA_RESETHAND;
    ours.sa_sigaction = on_sigint;
    return sigaction(SIGINT, &ours, NULL);
}

int xo_py_sigint_init(void) {
    PyObject *signal_mod = PyImport_ImportModule("signal");
    PyObject *threading = signal_mod ? PyImport_ImportModule("threading") : NULL;
    PyObject *main = threading ? PyObject_CallMethod(threading, "main_thread", NULL) : NULL;
    PyObject *ident = main ? PyObject_GetAttrString(main, "ident") : NULL;
    if (ident) main_thread = PyLong_AsUnsignedLong(ident);
    if (ident && !PyErr_Occurred()) {
        getsignal = PyObject_GetAttrString(signal_mod, "getsignal");
        default_int_handler = getsignal ? PyObject_GetAttrString(signal_mod, "default_int_handler") : NULL;
    }
    Py_XDECREF(signal_mod);
    Py_XDECREF(threading);
    Py_XDECREF(main);
    Py_XDECREF(ident);
    return default_int_handler ? 0 : -1;
}

void xo_py_sigint_watch(xo_interrupt *i) {
    i->counter = NULL;
    i->seen = 0;
    /* only the main thread gets KeyboardInterrupt, and only from Python's default handler */
    if (PyThread_get_thread_ident() != main_thread) return;
    PyObject *h = PyObject_CallFunction(getsignal, "i", SIGINT);
    const int is_default = h == default_int_handler;
    Py_XDECREF(h);
    if (!h) PyErr_Clear();  /* cannot tell: leave the call uninterruptible, as without this file */
    if (!is_default || chain_handler() != 0) return;
    i->counter = &sigint_count;
    i->seen = atomic_load_explicit(&sigint_count, memory_order_relaxed);
}
