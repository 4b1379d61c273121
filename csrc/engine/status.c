#include "engine/status.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char last_error[1024];

xo_status xo_fail(xo_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

const char *xo_last_error(void) { return last_error; }
