#include "engine/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[4096];

/* Cuts a message that vsnprintf truncated back to the last whole UTF-8 character, so the
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
    int n = vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof last_error) trim_partial_character(last_error, strlen(last_error));
    return code;
}

const char *xo_last_error(void) { return last_error; }
