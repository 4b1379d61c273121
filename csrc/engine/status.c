#include "engine/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[1024];

xo_status xo_fail(xo_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

xo_status xo_fail_more(xo_status code, const char *fmt, ...) {
    char reason[sizeof last_error];
    memcpy(reason, last_error, sizeof reason);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    size_t len = strlen(last_error);
    if (reason[0] && len + 2 < sizeof last_error) {  /* "<context>: <reason>", cut to fit */
        memcpy(last_error + len, ": ", 2);
        len += 2;
        size_t n = strlen(reason);
        if (n > sizeof last_error - 1 - len) n = sizeof last_error - 1 - len;
        memcpy(last_error + len, reason, n);
        last_error[len + n] = '\0';
    }
    return code;
}

const char *xo_last_error(void) { return last_error; }
