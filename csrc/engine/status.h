/* Status codes and the per-thread error message every C entry point leaves behind. */
#ifndef XO_STATUS_H
#define XO_STATUS_H

typedef enum {
    XO_OK = 0,
    XO_EINVAL,       /* bad argument or config value          -> ValueError   */
    XO_EFORMAT,      /* corrupt or mismatched checkpoint       -> ValueError   */
    XO_ENOMEM,       /* allocation failed                      -> MemoryError  */
    XO_EIO,          /* file could not be opened or mapped     -> OSError      */
    XO_EUNSUPPORTED, /* valid request this build cannot serve  -> RuntimeError */
    XO_EDEVICE,      /* accelerator runtime failure            -> RuntimeError */
    XO_EINTERRUPTED, /* stopped early by an interrupt request  -> KeyboardInterrupt */
    XO_EBUSY,        /* re-entrant call on a model in use      -> RuntimeError */
} xo_status;

/* Records a printf-style message for the calling thread and returns `code`. */
xo_status xo_fail(xo_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Records "<printf-style context>: <the message already recorded>" and returns `code`: for a
 * caller that adds what it was doing to the reason a callee gave (a failed be->mem.alloc). */
xo_status xo_fail_more(xo_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The message of the last failure on this thread ("" if none). */
const char *xo_last_error(void);

/* The engine's error channel, handed to code built apart from it (the CUDA plugin), so that
 * its failures reach the caller as the engine's own. */
typedef struct {
    xo_status (*fail)(xo_status code, const char *fmt, ...);
    const char *(*last_error)(void);
} xo_error_sink;

#define XO_TRY(expr)                       \
    do {                                   \
        xo_status xo_try_s_ = (expr);      \
        if (xo_try_s_ != XO_OK) return xo_try_s_; \
    } while (0)

#endif
