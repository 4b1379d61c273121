#include "engine/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[4096];

/* Cuts a message that was truncated to fit back to the last whole UTF-8 character, so the
 * binding can always decode it. */
static void trim_partial_character(char *s, size_t len) {
    size_t lead = len;
    while (lead > 0 && ((unsigned char)s[lead - 1] & 0xc0u) == 0x80u) lead--;
    if (lead == 0) return;
    const unsigned char c = (unsigned char)s[lead - 1];
    const size_t need = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
    if (len - (lead - 1) < need) s[lead - 1] = '\0';
}

xo_status xo_fail(xo_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    trim_partial_character(last_error, strlen(last_error));
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
    trim_partial_character(last_error, strlen(last_error));
    return code;
}

const char *xo_last_error(void) { return last_error; }
