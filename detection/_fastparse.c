/* The common audit line, parsed in C: detection.records.parse_line's first step.
 *
 * parse(line, record_type), line a str or bytes, returns
 * record_type(rtype, ts, serial, fields, {}) for a line it is certain to parse exactly as
 * the Python parser does, and None for every other line, which parse_line then parses in
 * Python (so every error and its reason stay the Python parser's). "Certain" means:
 * printable ASCII only (no tab, no 0x1d enrichment, no newline), no single quote, a
 * well-formed msg=audit(TS:SERIAL): header, every body token key=value with a non-empty
 * key, a double quote only as the first and last character of a value, a hex value of a
 * strictly encoded field valid hex, and a SYSCALL with a numeric pid and a syscall. Then
 * the body splits on spaces, values lose their quotes, the unquoted values of the encoded
 * fields (and of an EXECVE's arguments a0, a1, a2[0], ...) are hex-decoded (UTF-8, bad
 * bytes replaced), and a repeated key keeps its first place and takes its last value:
 * exactly what the Python parser gives (tests/detection/test_records.py compares the two
 * on the corpora and on mutants of them).
 *
 * The timestamp and serial go through float() and int() themselves (PyFloat_FromString,
 * PyLong_FromUnicodeObject), so they accept and reject what the Python parser does.
 * Keys are interned: the engine's lookups by literal name then compare pointers.
 *
 * feed(lines, start, record_type, add, events) is DetectionEngine.process_lines' loop over
 * the lines parse() takes (each record straight to the coalescer's add), and
 * syscall_values(fields, syscalls) the SYSCALL part of detection.events' fold, both below.
 * The per-edge steps in C are in _fastedges.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *ZERO;  /* the int 0 */

/* the last msg=audit(...) stamp that parsed, with its time and serial */
#define STAMP_MAX 48
static struct {
    PyObject *ts, *serial;
    Py_ssize_t len;
    unsigned char bytes[STAMP_MAX];
} LAST;

/* The line being parsed: a str or a bytes object, printable ASCII either way (checked
 * first), so a slice of it is a str of the same characters. */
typedef struct {
    PyObject *obj;
    const unsigned char *s;
    int is_bytes;
} src_t;

static PyObject *
text(const src_t *src, Py_ssize_t a, Py_ssize_t b)
{
    if (src->is_bytes)
        return PyUnicode_DecodeASCII((const char *)src->s + a, b - a, NULL);
    return PyUnicode_Substring(src->obj, a, b);
}

/* field kinds: an always-encoded field's unquoted value is hex; of those, a strict one
 * must be valid hex. The names, and the values never decoded, are detection.records'
 * ENCODED_FIELDS, _STRICT_HEX and _SPECIAL, handed over by configure(). */
enum { PLAIN = 0, ENCODED = 1, STRICT = 3 };
static char **ENCODED_NAMES, **STRICT_NAMES, **SPECIAL_VALUES;  /* NULL-terminated */

static int
in_list(char *const *list, const unsigned char *s, Py_ssize_t n)
{
    for (; *list; list++) {
        if ((Py_ssize_t)strlen(*list) == n && memcmp(*list, s, n) == 0)
            return 1;
    }
    return 0;
}

static void
free_list(char **list)
{
    for (char **p = list; p && *p; p++)
        PyMem_Free(*p);
    PyMem_Free(list);
}

/* The str items of an iterable as a NULL-terminated array of C strings, or NULL. */
static char **
list_of(PyObject *names)
{
    PyObject *seq = PySequence_Fast(names, "configure() takes collections of str");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    char **out = PyMem_Calloc(n + 1, sizeof(char *));
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        Py_ssize_t len;
        const char *c = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(seq, i), &len);
        if (c == NULL || (out[i] = PyMem_Malloc(len + 1)) == NULL) {
            free_list(out);
            out = NULL;
            break;
        }
        memcpy(out[i], c, len + 1);
    }
    Py_DECREF(seq);
    if (out == NULL && !PyErr_Occurred())
        PyErr_NoMemory();
    return out;
}

/* A direct-mapped cache of str objects by their bytes: field names (interned, with their
 * kind) and short values (``0``, ``yes``, ``c000003e``, a uid), each created once and
 * shared by the records that carry it (str is immutable, and the Python parser's memo
 * shares values between records too). A collision replaces the entry. Lives as long as
 * the process. */
#define CACHED_MAX 24
typedef struct {
    PyObject *obj;
    int kind;
    Py_ssize_t len;
    unsigned char bytes[CACHED_MAX];
} cached_t;
#define KEY_SLOTS 1024
#define VAL_SLOTS 4096
static cached_t KEYS[KEY_SLOTS], VALS[VAL_SLOTS];

/* The entry of table (slots a power of two) for s[0:n], or NULL when n is too long. */
static cached_t *
entry_for(cached_t *table, size_t slots, const unsigned char *s, Py_ssize_t n)
{
    if (n > CACHED_MAX)
        return NULL;
    uint32_t h = 2166136261u;
    for (Py_ssize_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 16777619u;
    return &table[h & (slots - 1)];
}

static int
holds(const cached_t *e, const unsigned char *s, Py_ssize_t n)
{
    return e != NULL && e->obj != NULL && e->len == n && memcmp(e->bytes, s, n) == 0;
}

static void
keep(cached_t *e, PyObject *obj, int kind, const unsigned char *s, Py_ssize_t n)
{
    if (e == NULL)
        return;
    Py_XSETREF(e->obj, Py_NewRef(obj));
    e->kind = kind;
    e->len = n;
    memcpy(e->bytes, s, n);
}

/* A new reference to the field name s[k0:k1] of line (and its kind), or NULL on error. */
static PyObject *
key_of(const src_t *src, Py_ssize_t k0, Py_ssize_t k1, int *kind)
{
    Py_ssize_t n = k1 - k0;
    const unsigned char *k = src->s + k0;
    cached_t *e = entry_for(KEYS, KEY_SLOTS, k, n);
    if (holds(e, k, n)) {
        *kind = e->kind;
        return Py_NewRef(e->obj);
    }
    PyObject *key = text(src, k0, k1);
    if (key == NULL)
        return NULL;
    PyUnicode_InternInPlace(&key);
    *kind = in_list(STRICT_NAMES, k, n) ? STRICT : in_list(ENCODED_NAMES, k, n) ? ENCODED : PLAIN;
    keep(e, key, *kind, k, n);
    return key;
}

/* A new reference to the value s[v0:v1] of line, from the cache when it is short. */
static PyObject *
short_value(const src_t *src, Py_ssize_t v0, Py_ssize_t v1)
{
    Py_ssize_t n = v1 - v0;
    const unsigned char *v = src->s + v0;
    if (n < 2)  /* one-character strings are cached by Python itself */
        return text(src, v0, v1);
    cached_t *e = entry_for(VALS, VAL_SLOTS, v, n);
    if (holds(e, v, n))
        return Py_NewRef(e->obj);
    PyObject *val = text(src, v0, v1);
    if (val != NULL)
        keep(e, val, PLAIN, v, n);
    return val;
}

static PyObject *
configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "configure(encoded, strict, special) takes 3 arguments");
        return NULL;
    }
    char **lists[3];
    for (int i = 0; i < 3; i++) {
        lists[i] = list_of(args[i]);
        if (lists[i] == NULL) {
            while (i--)
                free_list(lists[i]);
            return NULL;
        }
    }
    free_list(ENCODED_NAMES);
    free_list(STRICT_NAMES);
    free_list(SPECIAL_VALUES);
    ENCODED_NAMES = lists[0];
    STRICT_NAMES = lists[1];
    SPECIAL_VALUES = lists[2];
    for (int i = 0; i < KEY_SLOTS; i++)  /* the names' kinds may have changed */
        Py_CLEAR(KEYS[i].obj);
    Py_RETURN_NONE;
}

/* per byte: 1 a space, 0 a character the C parser takes, REJECT one that sends the line
 * to Python (control characters, 0x1d enrichment, non-ASCII, a single quote) */
#define REJECT 2
static unsigned char CHAR_CLASS[256];

static void
init_char_class(void)
{
    for (int c = 0; c < 256; c++)
        CHAR_CLASS[c] = (c < 0x20 || c > 0x7e || c == '\'') ? REJECT : (c == ' ');
}

static int
hexval(unsigned char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The value object of one token's value text; NULL with no exception set: hand the line
 * to Python; NULL with an exception: a real error. */
static PyObject *
value_of(const src_t *src, int kind, Py_ssize_t v0, Py_ssize_t v1)
{
    const unsigned char *s = src->s;
    Py_ssize_t n = v1 - v0;
    const unsigned char *v = s + v0;
    if (n > 0 && v[0] == '"') {
        if (n < 2 || v[n - 1] != '"')
            return NULL;
        if (n > 2 && memchr(v + 1, '"', n - 2) != NULL)
            return NULL;
        return text(src, v0 + 1, v1 - 1);
    }
    if (n > 0 && memchr(v, '"', n) != NULL)
        return NULL;
    if (n == 0 || kind == PLAIN)
        return short_value(src, v0, v1);
    if (in_list(SPECIAL_VALUES, v, n))
        return short_value(src, v0, v1);
    int ok = (n % 2) == 0;
    for (Py_ssize_t i = 0; ok && i < n; i++)
        ok = hexval(v[i]) >= 0;
    if (!ok) {
        if (kind == STRICT)
            return NULL;  /* Python reports it */
        return text(src, v0, v1);
    }
    char stack[256];
    char *buf = n / 2 <= (Py_ssize_t)sizeof(stack) ? stack : PyMem_Malloc(n / 2);
    if (buf == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n / 2; i++)
        buf[i] = (char)((hexval(v[2 * i]) << 4) | hexval(v[2 * i + 1]));
    PyObject *out = PyUnicode_DecodeUTF8(buf, n / 2, "replace");
    if (buf != stack)
        PyMem_Free(buf);
    return out;
}

/* parse() of one line: a new reference to the record, to None, or NULL on an error */
static PyObject *
parse_one(PyObject *line, PyObject *record_type)
{
    src_t src;
    Py_ssize_t n;
    src.obj = line;
    if (PyUnicode_CheckExact(src.obj) && PyUnicode_IS_ASCII(src.obj)) {
        src.s = PyUnicode_1BYTE_DATA(src.obj);
        src.is_bytes = 0;
        n = PyUnicode_GET_LENGTH(src.obj);
    } else if (PyBytes_CheckExact(src.obj)) {
        src.s = (const unsigned char *)PyBytes_AS_STRING(src.obj);
        src.is_bytes = 1;
        n = PyBytes_GET_SIZE(src.obj);
    } else {
        Py_RETURN_NONE;
    }
    const unsigned char *s = src.s;
    Py_ssize_t spaces = 0;  /* at most one field per space: the dict is sized once */
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char cls = CHAR_CLASS[s[i]];
        if (cls == REJECT)
            Py_RETURN_NONE;
        spaces += cls;
    }
    if (n < 5 || memcmp(s, "type=", 5) != 0)
        Py_RETURN_NONE;
    const unsigned char *p = memchr(s + 5, ' ', n - 5);
    if (p == NULL)
        Py_RETURN_NONE;
    Py_ssize_t sp = p - s;
    int is_execve = (sp - 5 == 6 && memcmp(s + 5, "EXECVE", 6) == 0);
    if (n - sp < 11 || memcmp(s + sp, " msg=audit(", 11) != 0)
        Py_RETURN_NONE;
    Py_ssize_t close = -1;
    for (Py_ssize_t i = sp + 11; i + 1 < n; i++) {
        if (s[i] == ')' && s[i + 1] == ':') {
            close = i;
            break;
        }
    }
    if (close < 0)
        Py_RETURN_NONE;
    const unsigned char *c = memchr(s + sp + 11, ':', close - (sp + 11));
    if (c == NULL)
        Py_RETURN_NONE;
    Py_ssize_t colon = c - s;
    int is_syscall = (sp - 5 == 7 && memcmp(s + 5, "SYSCALL", 7) == 0);

    PyObject *rtype = NULL, *ts = NULL, *serial = NULL, *fields = NULL, *tmp = NULL;
    PyObject *enriched = NULL, *result = NULL;
    Py_ssize_t stamp_len = close - (sp + 11);
    if (LAST.ts != NULL && LAST.len == stamp_len &&
        memcmp(LAST.bytes, s + sp + 11, stamp_len) == 0) {
        /* the records of one event share their header */
        ts = Py_NewRef(LAST.ts);
        serial = Py_NewRef(LAST.serial);
    } else {
        tmp = text(&src, sp + 11, colon);
        if (tmp == NULL)
            goto done;
        ts = PyFloat_FromString(tmp);
        Py_CLEAR(tmp);
        if (ts == NULL || Py_IS_NAN(PyFloat_AS_DOUBLE(ts)))
            goto fallback;
        tmp = text(&src, colon + 1, close);
        if (tmp == NULL)
            goto done;
        serial = PyLong_FromUnicodeObject(tmp, 10);
        Py_CLEAR(tmp);
        if (serial == NULL)
            goto fallback;
        if (PyObject_RichCompareBool(serial, ZERO, Py_LT) != 0)  /* serial < 0, or an error */
            goto fallback;
        if (stamp_len <= STAMP_MAX) {
            Py_XSETREF(LAST.ts, Py_NewRef(ts));
            Py_XSETREF(LAST.serial, Py_NewRef(serial));
            LAST.len = stamp_len;
            memcpy(LAST.bytes, s + sp + 11, stamp_len);
        }
    }

    fields = _PyDict_NewPresized(spaces);
    if (fields == NULL)
        goto done;
    int have_pid = 0, have_syscall = 0;
    Py_ssize_t i = close + 2;
    while (i < n) {
        while (i < n && s[i] == ' ')
            i++;
        if (i >= n)
            break;
        Py_ssize_t t0 = i;
        while (i < n && s[i] != ' ')
            i++;
        const unsigned char *e = memchr(s + t0, '=', i - t0);
        if (e == NULL || e == s + t0)
            goto fallback;
        Py_ssize_t eq = e - s;
        if (memchr(s + t0, '"', eq - t0) != NULL)
            goto fallback;
        int kind;
        PyObject *key = key_of(&src, t0, eq, &kind);
        if (key == NULL)
            goto done;
        if (is_execve && kind == PLAIN && eq - t0 >= 2 && s[t0] == 'a' && s[t0 + 1] >= '0' &&
            s[t0 + 1] <= '9' && memchr(s + t0, '_', eq - t0) == NULL)
            kind = ENCODED;  /* an argument (a0, a1[2]): hex when it holds odd characters */
        PyObject *val = value_of(&src, kind, eq + 1, i);
        if (val == NULL) {
            Py_DECREF(key);
            if (PyErr_Occurred())
                goto done;
            goto fallback;
        }
        if (is_syscall) {
            Py_ssize_t kn = eq - t0;
            if (kn == 3 && memcmp(s + t0, "pid", 3) == 0) {
                /* the last pid counts (a repeated key takes its last value) */
                Py_ssize_t vn = PyUnicode_GET_LENGTH(val);
                have_pid = vn > 0 && PyUnicode_IS_ASCII(val);
                const unsigned char *d = PyUnicode_1BYTE_DATA(val);
                for (Py_ssize_t j = 0; have_pid && j < vn; j++)
                    have_pid = d[j] >= '0' && d[j] <= '9';
            } else if (kn == 7 && memcmp(s + t0, "syscall", 7) == 0) {
                have_syscall = 1;
            }
        }
        int rc = PyDict_SetItem(fields, key, val);
        Py_DECREF(key);
        Py_DECREF(val);
        if (rc < 0)
            goto done;
    }
    if (is_syscall && !(have_pid && have_syscall))
        goto fallback;
    int rkind;
    rtype = key_of(&src, 5, sp, &rkind);
    if (rtype == NULL)
        goto done;
    enriched = PyDict_New();
    if (enriched == NULL)
        goto done;
    PyObject *rargs[5] = {rtype, ts, serial, fields, enriched};
    result = PyObject_Vectorcall(record_type, rargs, 5, NULL);
    goto done;

fallback:
    PyErr_Clear();
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(tmp);
    Py_XDECREF(rtype);
    Py_XDECREF(ts);
    Py_XDECREF(serial);
    Py_XDECREF(fields);
    Py_XDECREF(enriched);
    return result;
}

static int
configured(void)
{
    if (ENCODED_NAMES == NULL)
        PyErr_SetString(PyExc_RuntimeError, "detection._fastparse.configure() was not called");
    return ENCODED_NAMES != NULL;
}

static PyObject *
fast_parse(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse(line, record_type) takes 2 arguments");
        return NULL;
    }
    if (!configured())
        return NULL;
    return parse_one(args[0], args[1]);
}

/* feed(lines, start, record_type, add, events): DetectionEngine.process_lines' loop over
 * its lines from index start, for as long as each line is one parse() takes: the record
 * goes to add (the coalescer's add method) and the events add returns are appended to
 * the list events. Returns (index of the first line parse() hands to Python, or
 * len(lines); records fed). A line parse() takes is a single audit line, which
 * process_lines would have handed to parse_line and then to add as well. */
static PyObject *
feed(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !(PyList_CheckExact(args[0]) || PyTuple_CheckExact(args[0])) ||
        !PyLong_Check(args[1]) || !PyList_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "feed(lines: list | tuple, start: int, record_type, add, events: list)");
        return NULL;
    }
    if (!configured())
        return NULL;
    PyObject *lines = args[0], *events = args[4];
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t fed = 0;
    for (; i >= 0 && i < PySequence_Fast_GET_SIZE(lines); i++) {
        PyObject *line = Py_NewRef(PySequence_Fast_GET_ITEM(lines, i));  /* Record() is Python */
        PyObject *rec = parse_one(line, args[2]);
        Py_DECREF(line);
        if (rec == NULL)
            return NULL;
        if (rec == Py_None) {
            Py_DECREF(rec);
            break;
        }
        fed++;
        PyObject *done = PyObject_CallOneArg(args[3], rec);
        Py_DECREF(rec);
        if (done == NULL)
            return NULL;
        Py_ssize_t end = PyList_GET_SIZE(events);
        int rc = PyObject_IsTrue(done);  /* process_lines: if done: events.extend(done) */
        if (rc > 0)
            rc = PyList_SetSlice(events, end, end, done);
        Py_DECREF(done);
        if (rc < 0)
            return NULL;
    }
    return Py_BuildValue("(nn)", i, fed);
}

/* ------------------------------------------------------------------------------------
 * syscall_values(fields, syscalls): what detection.events.event_from_records takes from
 * a SYSCALL record's fields, in C: (syscall name, success, exit, pid, ppid, uid, euid,
 * auid, ses, comm, exe, key, (a0, a1, a2, a3)), or None when a field it reads is not a
 * str (the Python fold then handles the record). The numbers are int(v), else
 * int(v, 16), else the default (events._int), the arguments int(v, 16) or 0
 * (events._hexint); syscalls maps an x86_64 syscall number to its name.
 */
enum { F_SYSCALL, F_ARCH, F_SUCCESS, F_EXIT, F_PID, F_PPID, F_UID, F_EUID, F_AUID, F_SES,
       F_COMM, F_EXE, F_KEY, F_A0, F_A1, F_A2, F_A3, F_COUNT };
static const char *const FIELD_NAMES[F_COUNT] = {
    "syscall", "arch", "success", "exit", "pid", "ppid", "uid", "euid", "auid", "ses",
    "comm", "exe", "key", "a0", "a1", "a2", "a3"};
static PyObject *FIELD_KEYS[F_COUNT];
static PyObject *S_YES, *S_NULL, *S_X86_64, *MINUS_ONE;

/* int(v, base) of a short ASCII str of plain digits ("-" first for base 10): the common
 * field, without int()'s general parser; NULL (no exception) for anything else, which
 * then takes int() itself */
static PyObject *
plain_int(PyObject *v, int base)
{
    if (!PyUnicode_IS_ASCII(v))
        return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(v);
    const unsigned char *d = PyUnicode_1BYTE_DATA(v);
    int neg = base == 10 && n > 1 && d[0] == '-';
    Py_ssize_t i = neg;
    if (n - i < 1 || n - i > 15)
        return NULL;
    long long x = 0;
    for (; i < n; i++) {
        int h = hexval(d[i]);
        if (h < 0 || h >= base)
            return NULL;
        x = x * base + h;
    }
    return PyLong_FromLongLong(neg ? -x : x);
}

/* int(v, base) of a str (a new reference); NULL with no exception set when int() raises
 * ValueError, NULL with one for any other error */
static PyObject *
int_or_null(PyObject *v, int base)
{
    PyObject *r = plain_int(v, base);
    if (r != NULL)
        return r;
    r = PyLong_FromUnicodeObject(v, base);
    if (r == NULL && PyErr_ExceptionMatches(PyExc_ValueError))
        PyErr_Clear();
    return r;
}

/* A field's number (a new reference; v NULL when the field is absent): int(v), then
 * int(v, 16) (events._int, base 10), or int(v, 16) alone (events._hexint, base 16);
 * dflt when absent or when neither parses */
static PyObject *
int_of(PyObject *v, int base, PyObject *dflt)
{
    PyObject *r = v == NULL ? NULL : int_or_null(v, base);
    if (r == NULL && v != NULL && base == 10 && !PyErr_Occurred())
        r = int_or_null(v, 16);
    if (r == NULL && !PyErr_Occurred())
        r = Py_NewRef(dflt);
    return r;
}

static PyObject *
syscall_values(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyDict_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "syscall_values(fields: dict, syscalls: dict)");
        return NULL;
    }
    PyObject *f[F_COUNT];  /* borrowed; NULL when absent */
    for (int i = 0; i < F_COUNT; i++) {
        f[i] = PyDict_GetItemWithError(args[0], FIELD_KEYS[i]);
        if (f[i] == NULL && PyErr_Occurred())
            return NULL;
        if (f[i] != NULL && !PyUnicode_CheckExact(f[i]))
            Py_RETURN_NONE;
    }
    PyObject *out = PyTuple_New(13);
    if (out == NULL)
        return NULL;
    PyObject *nr = int_of(f[F_SYSCALL], 10, MINUS_ONE);
    if (nr == NULL)
        goto fail;
    PyObject *name = NULL;
    int x86 = f[F_ARCH] == NULL ? 1 : PyUnicode_Compare(f[F_ARCH], S_X86_64) == 0;
    if (x86) {
        name = PyDict_GetItemWithError(args[1], nr);
        if (name != NULL)
            Py_INCREF(name);
        else if (PyErr_Occurred()) {
            Py_DECREF(nr);
            goto fail;
        }
    }
    if (name == NULL)
        name = PyUnicode_FromFormat("syscall_%S", nr);
    Py_DECREF(nr);
    if (name == NULL)
        goto fail;
    PyTuple_SET_ITEM(out, 0, name);
    int ok = f[F_SUCCESS] == NULL || PyUnicode_Compare(f[F_SUCCESS], S_YES) == 0;
    PyTuple_SET_ITEM(out, 1, Py_NewRef(ok ? Py_True : Py_False));
    static const int ints[] = {F_EXIT, F_PID, F_PPID, F_UID, F_EUID, F_AUID, F_SES};
    for (int i = 0; i < 7; i++) {
        PyObject *v = int_of(f[ints[i]], 10, Py_None);
        if (v == NULL)
            goto fail;
        PyTuple_SET_ITEM(out, 2 + i, v);
    }
    PyTuple_SET_ITEM(out, 9, Py_NewRef(f[F_COMM] ? f[F_COMM] : Py_None));
    PyTuple_SET_ITEM(out, 10, Py_NewRef(f[F_EXE] ? f[F_EXE] : Py_None));
    PyObject *key = f[F_KEY];
    if (key != NULL && PyUnicode_Compare(key, S_NULL) == 0)
        key = NULL;
    PyTuple_SET_ITEM(out, 11, Py_NewRef(key ? key : Py_None));
    PyObject *a = PyTuple_New(4);
    if (a == NULL)
        goto fail;
    PyTuple_SET_ITEM(out, 12, a);
    for (int i = 0; i < 4; i++) {
        PyObject *v = int_of(f[F_A0 + i], 16, ZERO);
        if (v == NULL)
            goto fail;
        PyTuple_SET_ITEM(a, i, v);
    }
    return out;
fail:
    Py_DECREF(out);  /* unset items are NULL: tuple dealloc skips them */
    return NULL;
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(encoded, strict, special): the field names whose unquoted values are hex, "
     "those that must be valid hex, and the values never decoded (detection.records)."},
    {"parse", (PyCFunction)(void (*)(void))fast_parse, METH_FASTCALL,
     "parse(line, record_type) -> record_type(rtype, ts, serial, fields, {}), or None for "
     "a line the Python parser must handle."},
    {"feed", (PyCFunction)(void (*)(void))feed, METH_FASTCALL,
     "feed(lines, start, record_type, add, events) -> (index of the first line parse() "
     "hands to Python, records fed): DetectionEngine.process_lines' loop over its common "
     "lines."},
    {"syscall_values", (PyCFunction)(void (*)(void))syscall_values, METH_FASTCALL,
     "syscall_values(fields, syscalls) -> what events.event_from_records takes from a "
     "SYSCALL record, or None when a field it reads is not a str."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "detection._fastparse",
    "The common audit line parsed in C (see detection.records.parse_line).", -1, methods,
};

PyMODINIT_FUNC
PyInit__fastparse(void)
{
    init_char_class();
    ZERO = PyLong_FromLong(0);
    MINUS_ONE = PyLong_FromLong(-1);
    S_YES = PyUnicode_InternFromString("yes");
    S_NULL = PyUnicode_InternFromString("(null)");
    S_X86_64 = PyUnicode_InternFromString("c000003e");
    if (!ZERO || !MINUS_ONE || !S_YES || !S_NULL || !S_X86_64)
        return NULL;
    for (int i = 0; i < F_COUNT; i++) {
        FIELD_KEYS[i] = PyUnicode_InternFromString(FIELD_NAMES[i]);
        if (FIELD_KEYS[i] == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}
