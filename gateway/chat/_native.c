/* The injection rewrite for the usual thirdUserData body, in one call.
 *
 * gateway/chat/inject.py is the reference and decides everything this file does not know:
 * FlatRewriter.rewrite answers None for any body outside a narrow, common subset, and the
 * Python path then parses, cleans, signs (or refuses) it. The subset: a JSON object whose
 * keys are plain ASCII (no escapes, no duplicates, no secretKey, no look-alike of an
 * identity field) and whose values are strings without escapes (valid UTF-8), integers of
 * at most 18 digits (not -0), true, false or null. For those, the json module would give
 * back the same bytes for every kept value, so the values are copied, the identity fields
 * are forced in place (or appended, in the order inject.IdentityForcer assigns them) and
 * the auth-v2 signature is made here with OpenSSL's SHA-256.
 *
 * Why native: the rewrite ran about 15 Python frames, orjson twice and OpenSSL's EVP layer
 * per chat page view; under load that was ~20 us of a ~200 us proxied request, the whole
 * gap between the injection path and the plain proxy path (bench/RESULTS.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <string.h>

/* Identity fields (inject.MANAGED_FIELDS) and the body's timestamp. */
enum { F_NAME, F_ID, F_TENANT, F_CHANNEL, F_AUTH, F_TOKEN, F_TIMESTAMP, F_OTHER };
#define N_MANAGED 6
static const char *const FIELD[] = {
    "thirdUserName", "thirdUserId", "tenantSpaceId", "channelConfigId",
    "thirdPartAuthorization", "thirdUserToken", "timestamp"};
/* The same names folded as inject._fold folds an ASCII key: letters lower-cased, only
 * letters and digits kept. */
static const char *const FOLDED[] = {
    "thirdusername", "thirduserid", "tenantspaceid", "channelconfigid",
    "thirdpartauthorization", "thirdusertoken"};
static const char FOLDED_SECRET[] = "secretkey";
#define FOLD_MAX 32 /* longer than any folded name above: cannot match */
#define MAX_MEMBERS 64

enum { V_STR, V_INT, V_LIT };

typedef struct {
    const char *key;
    Py_ssize_t klen;
    const char *val; /* the raw value; strings without their quotes */
    Py_ssize_t vlen;
    int kind;
    int ascii; /* strings: only bytes below 0x80 */
    int field;
} Member;

typedef struct {
    char *p;
    size_t len;
} Str;

typedef struct {
    PyObject_HEAD
    Str tenant, channel, uri, prefix_head, prefix_tail, signed_line, type_line;
    Py_ssize_t name_limit;
    int has_length;
    int payload[4];
    int npayload;
    SHA256_CTX secret_inner, secret_outer; /* HMAC pads of the secretKey */
    PyObject *timestamp_at;                /* ms -> the signature's timestamp text */
    /* The signing key depends on the timestamp alone: kept for its millisecond. */
    long long key_ms;
    int have_key;
    int prefix_plain; /* authStringPrefix needs no JSON escaping */
    char prefix[256];
    size_t prefix_len;
    SHA256_CTX key_inner, key_outer;
} FlatRewriter;

/* ------------------------------------------------------------------ helpers */

static int plain_ascii(const char *s, size_t n)
{
    /* JSON-plain: printable ASCII without '"' or '\\', so "..." is its own encoding. */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c > 0x7e || c == '"' || c == '\\')
            return 0;
    }
    return 1;
}

static int str_from(PyObject *obj, Str *out, const char *what, int plain)
{
    Py_ssize_t n;
    const char *s;
    if (obj == Py_None) {
        out->p = NULL;
        out->len = 0;
        return 0;
    }
    s = PyUnicode_AsUTF8AndSize(obj, &n);
    if (s == NULL)
        return -1;
    if (plain && !plain_ascii(s, (size_t)n)) {
        PyErr_Format(PyExc_ValueError, "%s is not plain ASCII", what);
        return -1;
    }
    out->p = PyMem_Malloc((size_t)n + 1);
    if (out->p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(out->p, s, (size_t)n + 1);
    out->len = (size_t)n;
    return 0;
}

static void str_free(Str *s)
{
    if (s->p != NULL) {
        PyMem_Free(s->p);
        s->p = NULL;
    }
}

static void hmac_pads(SHA256_CTX *inner, SHA256_CTX *outer, const unsigned char *key, size_t n)
{
    unsigned char k[64], pad[64];
    memset(k, 0, sizeof k);
    if (n > 64)
        SHA256(key, n, k);
    else
        memcpy(k, key, n);
    for (int i = 0; i < 64; i++)
        pad[i] = k[i] ^ 0x36;
    SHA256_Init(inner);
    SHA256_Update(inner, pad, 64);
    for (int i = 0; i < 64; i++)
        pad[i] = k[i] ^ 0x5c;
    SHA256_Init(outer);
    SHA256_Update(outer, pad, 64);
    OPENSSL_cleanse(k, sizeof k);
    OPENSSL_cleanse(pad, sizeof pad);
}

static const char HEX[] = "0123456789abcdef";

static void hmac_hex(const SHA256_CTX *inner, const SHA256_CTX *outer, const void *msg,
                     size_t n, char hex[64])
{
    unsigned char d[SHA256_DIGEST_LENGTH];
    SHA256_CTX c = *inner;
    SHA256_Update(&c, msg, n);
    SHA256_Final(d, &c);
    c = *outer;
    SHA256_Update(&c, d, sizeof d);
    SHA256_Final(d, &c);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        hex[2 * i] = HEX[d[i] >> 4];
        hex[2 * i + 1] = HEX[d[i] & 15];
    }
    OPENSSL_cleanse(&c, sizeof c);
}

/* A growable output buffer: the stack for the usual body, the heap past it. */
typedef struct {
    char *p;
    size_t len, cap;
    char *heap;
    int failed;
} Buf;

/* Room for n more bytes; 0 when out of memory (then every later write is dropped). */
static int buf_reserve(Buf *b, size_t n)
{
    if (b->failed)
        return 0;
    if (b->len + n > b->cap) {
        size_t cap = (b->len + n) * 2;
        char *q = PyMem_Realloc(b->heap, cap);
        if (q == NULL) {
            b->failed = 1;
            return 0;
        }
        if (b->heap == NULL)
            memcpy(q, b->p, b->len);
        b->heap = b->p = q;
        b->cap = cap;
    }
    return 1;
}

static void buf_put(Buf *b, const void *s, size_t n)
{
    if (buf_reserve(b, n)) {
        memcpy(b->p + b->len, s, n);
        b->len += n;
    }
}

static void buf_str(Buf *b, const char *s) { buf_put(b, s, strlen(s)); }

static void buf_quoted(Buf *b, const char *s, size_t n)
{
    if (buf_reserve(b, n + 2)) {
        char *o = b->p + b->len;
        o[0] = '"';
        memcpy(o + 1, s, n);
        o[n + 1] = '"';
        b->len += n + 2;
    }
}

static void buf_int(Buf *b, long long v)
{
    char tmp[24];
    size_t i = sizeof tmp;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        tmp[--i] = '-';
    buf_put(b, tmp + i, sizeof tmp - i);
}

/* RFC 3986 unreserved bytes stay, every other byte becomes %XX (signing.normalize). */
static void buf_normalized(Buf *b, const char *s, size_t n)
{
    static const char UHEX[] = "0123456789ABCDEF";
    if (!buf_reserve(b, 3 * n))
        return;
    char *o = b->p + b->len;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '.' || c == '_' || c == '~') {
            *o++ = (char)c;
        } else {
            *o++ = '%';
            *o++ = UHEX[c >> 4];
            *o++ = UHEX[c & 15];
        }
    }
    b->len = (size_t)(o - b->p);
}

/* ------------------------------------------------------------------ the subset parser */

static const unsigned char *skip_ws(const unsigned char *p, const unsigned char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* A string after its opening quote: no escapes, no control bytes, strict UTF-8.
 * Returns the closing quote, or NULL when outside the subset. */
static const unsigned char *scan_string(const unsigned char *p, const unsigned char *end,
                                        int *ascii)
{
    *ascii = 1;
    while (p < end) {
        unsigned char c = *p;
        if (c == '"')
            return p;
        if (c == '\\' || c < 0x20)
            return NULL;
        if (c < 0x80) {
            p++;
            continue;
        }
        *ascii = 0;
        /* Well-formed UTF-8 (Unicode 3.9, table 3-7): no overlongs, no surrogates. */
        unsigned char lo = 0x80, hi = 0xbf;
        int more;
        if (c >= 0xc2 && c <= 0xdf)
            more = 1;
        else if (c >= 0xe0 && c <= 0xef) {
            more = 2;
            if (c == 0xe0)
                lo = 0xa0;
            else if (c == 0xed)
                hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            more = 3;
            if (c == 0xf0)
                lo = 0x90;
            else if (c == 0xf4)
                hi = 0x8f;
        } else
            return NULL;
        if (end - p <= more)
            return NULL;
        if (p[1] < lo || p[1] > hi)
            return NULL;
        for (int i = 2; i <= more; i++)
            if (p[i] < 0x80 || p[i] > 0xbf)
                return NULL;
        p += more + 1;
    }
    return NULL;
}

static int classify_key(const char *k, Py_ssize_t n)
{
    char folded[FOLD_MAX + 1];
    size_t f = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = k[i];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        else if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')))
            continue;
        if (f == FOLD_MAX)
            return F_OTHER; /* too long to fold to any name we look for */
        folded[f++] = c;
    }
    folded[f] = 0;
    if (strcmp(folded, FOLDED_SECRET) == 0)
        return -1; /* a secretKey: inject.py strips it and warns */
    for (int i = 0; i < N_MANAGED; i++) {
        if (strcmp(folded, FOLDED[i]) == 0) {
            if ((size_t)n == strlen(FIELD[i]) && memcmp(k, FIELD[i], (size_t)n) == 0)
                return i;
            return -1; /* a look-alike: inject.py drops it */
        }
    }
    if (n == 9 && memcmp(k, "timestamp", 9) == 0)
        return F_TIMESTAMP;
    return F_OTHER;
}

/* Parse the object into members; 0 when outside the subset. */
static int parse_flat(const unsigned char *p, const unsigned char *end, Member *m, int *count)
{
    int n = 0;
    p = skip_ws(p, end);
    if (p == end || *p != '{')
        return 0;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') {
        p++;
        goto done;
    }
    for (;;) {
        int ascii;
        const unsigned char *q;
        if (n == MAX_MEMBERS || p == end || *p != '"')
            return 0;
        q = scan_string(p + 1, end, &ascii);
        if (q == NULL || !ascii)
            return 0;
        m[n].key = (const char *)p + 1;
        m[n].klen = q - p - 1;
        for (int i = 0; i < n; i++)
            if (m[i].klen == m[n].klen && memcmp(m[i].key, m[n].key, (size_t)m[n].klen) == 0)
                return 0; /* a repeated key */
        m[n].field = classify_key(m[n].key, m[n].klen);
        if (m[n].field < 0)
            return 0;
        p = skip_ws(q + 1, end);
        if (p == end || *p != ':')
            return 0;
        p = skip_ws(p + 1, end);
        if (p == end)
            return 0;
        if (*p == '"') {
            q = scan_string(p + 1, end, &m[n].ascii);
            if (q == NULL)
                return 0;
            m[n].kind = V_STR;
            m[n].val = (const char *)p + 1;
            m[n].vlen = q - p - 1;
            p = q + 1;
        } else if (*p == '-' || (*p >= '0' && *p <= '9')) {
            const unsigned char *s = p;
            if (*p == '-')
                p++;
            if (p == end)
                return 0;
            if (*p == '0') {
                p++;
                if (s[0] == '-')
                    return 0; /* -0 reads as 0: the json module would write "0" */
            } else if (*p >= '1' && *p <= '9') {
                while (p < end && *p >= '0' && *p <= '9')
                    p++;
            } else
                return 0;
            if (p < end && (*p == '.' || *p == 'e' || *p == 'E' || (*p >= '0' && *p <= '9')))
                return 0; /* a float (or a leading zero): the json module decides */
            if (p - s - (s[0] == '-') > 18)
                return 0; /* beyond 64 bits soon: the json module decides */
            m[n].kind = V_INT;
            m[n].val = (const char *)s;
            m[n].vlen = p - s;
        } else {
            static const char *const LITS[] = {"true", "false", "null"};
            int found = 0;
            for (int i = 0; i < 3 && !found; i++) {
                size_t l = strlen(LITS[i]);
                if ((size_t)(end - p) >= l && memcmp(p, LITS[i], l) == 0) {
                    m[n].val = (const char *)p;
                    m[n].vlen = (Py_ssize_t)l;
                    p += l;
                    found = 1;
                }
            }
            if (!found)
                return 0; /* an object, an array or not JSON */
            m[n].kind = V_LIT;
        }
        n++;
        p = skip_ws(p, end);
        if (p == end)
            return 0;
        if (*p == '}') {
            p++;
            break;
        }
        if (*p != ',')
            return 0;
        p = skip_ws(p + 1, end);
    }
done:
    if (skip_ws(p, end) != end)
        return 0;
    *count = n;
    return 1;
}

/* ------------------------------------------------------------------ signing */

static int ensure_key(FlatRewriter *self, long long ms)
{
    PyObject *ts;
    const char *t;
    Py_ssize_t tn;
    char hex[64];
    if (self->have_key && self->key_ms == ms)
        return 0;
    ts = PyObject_CallFunction(self->timestamp_at, "L", ms);
    if (ts == NULL)
        return -1;
    t = PyUnicode_AsUTF8AndSize(ts, &tn);
    if (t == NULL) {
        Py_DECREF(ts);
        return -1;
    }
    size_t need = self->prefix_head.len + (size_t)tn + self->prefix_tail.len;
    if (need > sizeof self->prefix) {
        Py_DECREF(ts);
        self->have_key = 0;
        return 1; /* an odd timestamp format: the Python path signs */
    }
    memcpy(self->prefix, self->prefix_head.p, self->prefix_head.len);
    memcpy(self->prefix + self->prefix_head.len, t, (size_t)tn);
    memcpy(self->prefix + self->prefix_head.len + tn, self->prefix_tail.p, self->prefix_tail.len);
    Py_DECREF(ts);
    self->prefix_len = need;
    self->prefix_plain = plain_ascii(self->prefix, need);
    /* signingKey = hex(HMAC(secret, authStringPrefix)); its 64 hex characters are the key. */
    hmac_hex(&self->secret_inner, &self->secret_outer, self->prefix, need, hex);
    hmac_pads(&self->key_inner, &self->key_outer, (const unsigned char *)hex, sizeof hex);
    OPENSSL_cleanse(hex, sizeof hex);
    self->key_ms = ms;
    self->have_key = 1;
    return 0;
}

/* ------------------------------------------------------------------ the type */

static int FlatRewriter_init(FlatRewriter *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tenant", "channel", "uri", "name_limit", "secret",
                             "prefix_head", "prefix_tail", "signed_line", "has_length",
                             "type_line", "payload_fields", "timestamp_at", NULL};
    PyObject *tenant, *channel, *uri, *prefix_head, *prefix_tail, *signed_line, *type_line;
    PyObject *fields, *timestamp_at;
    Py_buffer secret;
    Py_ssize_t name_limit;
    int has_length;
    if (self->timestamp_at != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FlatRewriter is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "UUUny*UUUpOOO", kwlist, &tenant, &channel,
                                     &uri, &name_limit, &secret, &prefix_head, &prefix_tail,
                                     &signed_line, &has_length, &type_line, &fields,
                                     &timestamp_at))
        return -1;
    if (!PyCallable_Check(timestamp_at) || (type_line != Py_None && !PyUnicode_Check(type_line))
        || !PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) == 0 ||
        PyTuple_GET_SIZE(fields) > 4) {
        PyBuffer_Release(&secret);
        PyErr_SetString(PyExc_ValueError,
                        "timestamp_at must be callable, type_line a str or None, payload_fields "
                        "a tuple of 1 to 4 names");
        return -1;
    }
    self->npayload = (int)PyTuple_GET_SIZE(fields);
    for (int i = 0; i < self->npayload; i++) {
        PyObject *f = PyTuple_GET_ITEM(fields, i);
        int found = -1;
        for (int j = F_NAME; j <= F_CHANNEL && PyUnicode_Check(f); j++)
            if (PyUnicode_CompareWithASCIIString(f, FIELD[j]) == 0)
                found = j;
        for (int j = 0; j < i && found >= 0; j++)
            if (self->payload[j] == found)
                found = -1;
        if (found < 0) {
            PyBuffer_Release(&secret);
            PyErr_SetString(PyExc_ValueError, "payload fields must be distinct identity fields "
                                              "(thirdUserName, thirdUserId, tenantSpaceId, "
                                              "channelConfigId)");
            return -1;
        }
        self->payload[i] = found;
    }
    hmac_pads(&self->secret_inner, &self->secret_outer, secret.buf, (size_t)secret.len);
    PyBuffer_Release(&secret);
    if (str_from(tenant, &self->tenant, "tenant", 1) < 0 ||
        str_from(channel, &self->channel, "channel", 1) < 0 ||
        str_from(uri, &self->uri, "uri", 0) < 0 ||
        str_from(prefix_head, &self->prefix_head, "prefix_head", 0) < 0 ||
        str_from(prefix_tail, &self->prefix_tail, "prefix_tail", 0) < 0 ||
        str_from(signed_line, &self->signed_line, "signed_line", 0) < 0 ||
        str_from(type_line, &self->type_line, "type_line", 0) < 0)
        return -1;
    self->name_limit = name_limit < 0 ? 0 : name_limit;
    self->has_length = has_length;
    Py_INCREF(timestamp_at);
    self->timestamp_at = timestamp_at;
    return 0;
}

static void FlatRewriter_dealloc(FlatRewriter *self)
{
    OPENSSL_cleanse(&self->secret_inner, sizeof self->secret_inner);
    OPENSSL_cleanse(&self->secret_outer, sizeof self->secret_outer);
    OPENSSL_cleanse(&self->key_inner, sizeof self->key_inner);
    OPENSSL_cleanse(&self->key_outer, sizeof self->key_outer);
    str_free(&self->tenant);
    str_free(&self->channel);
    str_free(&self->uri);
    str_free(&self->prefix_head);
    str_free(&self->prefix_tail);
    str_free(&self->signed_line);
    str_free(&self->type_line);
    Py_CLEAR(self->timestamp_at);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The thirdUserName to sign, or -1 when it needs the Python path's Unicode cleaning:
 * `forced` when given (a logged-in name, already cleaned by the caller), else the page's
 * name cleaned as inject.clean_user_name cleans printable ASCII, else the default cleaned
 * the same way: `deflt_given` (a logged-in user's id) or "Guest-" and six characters of the
 * guest id. */
static int chosen_name(FlatRewriter *self, const Member *page, const char *uid, size_t uidn,
                       const char *forced, size_t forcedn, const char *deflt_given,
                       size_t deflt_givenn, const char **name, size_t *namen, char *deflt)
{
    const char *s = NULL;
    size_t n = 0;
    if (forced != NULL) {
        *name = forced;
        *namen = forcedn;
        return 0;
    }
    if (page != NULL && page->kind == V_STR) {
        if (!page->ascii)
            return -1;
        s = page->val;
        n = (size_t)page->vlen;
        for (size_t i = 0; i < n; i++)
            if (s[i] == 0x7f)
                return -1; /* DEL is a control character: cleaned in Python */
    }
    for (int pass = 0; pass < 2; pass++) {
        /* str.strip() of printable ASCII strips spaces; then truncate, strip again. */
        while (n > 0 && s[0] == ' ') {
            s++;
            n--;
        }
        if (n > (size_t)self->name_limit)
            n = (size_t)self->name_limit;
        while (n > 0 && s[n - 1] == ' ')
            n--;
        if (n > 0 || pass == 1)
            break;
        if (deflt_given != NULL) {
            s = deflt_given;
            n = deflt_givenn;
            continue;
        }
        const char *id = uid;
        size_t idn = uidn;
        if (idn >= 6 && memcmp(id, "guest-", 6) == 0) {
            id += 6;
            idn -= 6;
        }
        memcpy(deflt, "Guest-", 6);
        if (idn > 6)
            idn = 6;
        memcpy(deflt + 6, id, idn);
        s = deflt;
        n = 6 + idn;
    }
    *name = s;
    *namen = n;
    return 0;
}

/* An optional str argument that must be JSON-plain ASCII: 1 with (*s, *n) set, 0 for None,
 * -1 when it is not plain (the caller declines) or not a str (an error is set). */
static int plain_arg(PyObject *obj, const char **s, Py_ssize_t *n)
{
    if (obj == Py_None) {
        *s = NULL;
        *n = 0;
        return 0;
    }
    if (!PyUnicode_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "name and default_name must be str or None");
        return -2;
    }
    *s = PyUnicode_AsUTF8AndSize(obj, n);
    if (*s == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return -2;
        PyErr_Clear(); /* a lone surrogate: the Python path decides */
        return -1;
    }
    return plain_ascii(*s, (size_t)*n) ? 1 : -1;
}

PyDoc_STRVAR(rewrite_doc,
"rewrite(body, user_id, now_ms, name=None, default_name=None) -> bytes | None\n\n"
"The forwarded thirdUserData for the body, signed for user_id, or None when the body is\n"
"outside the subset this module handles (inject.py then rewrites it, or refuses it).\n"
"name: the thirdUserName to sign when the caller already chose it (a logged-in name);\n"
"default_name: the name when the page gives none (default: Guest- and the guest id).");

static PyObject *FlatRewriter_rewrite(FlatRewriter *self, PyObject *const *args,
                                      Py_ssize_t nargs)
{
    Member m[MAX_MEMBERS];
    int n = 0, at[F_OTHER];
    const char *uid, *name;
    Py_ssize_t uidn;
    size_t namen;
    char deflt[12], stack[2048], pstack[512], cstack[1024], sig[64];
    long long now_ms;
    char *body;
    Py_ssize_t blen;
    PyObject *result = NULL;

    if (self->timestamp_at == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FlatRewriter is not initialised");
        return NULL;
    }
    if (nargs < 3 || nargs > 5 || !PyBytes_Check(args[0]) || !PyUnicode_Check(args[1]) ||
        !PyLong_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "rewrite(body: bytes, user_id: str, now_ms: int, "
                                         "name: str | None, default_name: str | None)");
        return NULL;
    }
    const char *forced = NULL, *deflt_given = NULL;
    Py_ssize_t forcedn = 0, deflt_givenn = 0;
    for (Py_ssize_t i = 3; i < nargs; i++) {
        int got = plain_arg(args[i], i == 3 ? &forced : &deflt_given,
                            i == 3 ? &forcedn : &deflt_givenn);
        if (got == -2)
            return NULL;
        if (got == -1)
            Py_RETURN_NONE;
    }
    now_ms = PyLong_AsLongLong(args[2]);
    if (now_ms == -1 && PyErr_Occurred())
        return NULL;
    uid = PyUnicode_AsUTF8AndSize(args[1], &uidn);
    if (uid == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return NULL;
        PyErr_Clear(); /* a lone surrogate: the Python path refuses it (400) */
        Py_RETURN_NONE;
    }
    if (!plain_ascii(uid, (size_t)uidn))
        Py_RETURN_NONE;
    PyBytes_AsStringAndSize(args[0], &body, &blen);
    if (!parse_flat((const unsigned char *)body, (const unsigned char *)body + blen, m, &n))
        Py_RETURN_NONE;
    for (int f = 0; f < F_OTHER; f++)
        at[f] = -1;
    for (int i = 0; i < n; i++)
        if (m[i].field != F_OTHER)
            at[m[i].field] = i;
    if (chosen_name(self, at[F_NAME] >= 0 ? &m[at[F_NAME]] : NULL, uid, (size_t)uidn, forced,
                    (size_t)forcedn, deflt_given, (size_t)deflt_givenn, &name, &namen,
                    deflt) < 0)
        Py_RETURN_NONE;

    const char *value[4] = {name, uid, self->tenant.p, self->channel.p};
    size_t vlen[4] = {namen, (size_t)uidn, self->tenant.len, self->channel.len};
    Buf pay = {pstack, 0, sizeof pstack, NULL, 0};
    Buf canon = {cstack, 0, sizeof cstack, NULL, 0};
    Buf b = {stack, 0, sizeof stack, NULL, 0};

    /* The payload, then the canonical request (signing._canonical_tail). */
    buf_put(&pay, "{", 1);
    for (int i = 0; i < self->npayload; i++) {
        int f = self->payload[i];
        if (i > 0)
            buf_put(&pay, ",", 1);
        buf_quoted(&pay, FIELD[f], strlen(FIELD[f]));
        buf_put(&pay, ":", 1);
        buf_quoted(&pay, value[f], vlen[f]);
    }
    buf_put(&pay, "}", 1);
    buf_str(&canon, "POST\n");
    buf_put(&canon, self->uri.p, self->uri.len);
    buf_put(&canon, "\n", 1);
    buf_put(&canon, self->signed_line.p, self->signed_line.len);
    if (self->has_length) {
        buf_str(&canon, "\ncontent-length:");
        buf_int(&canon, (long long)pay.len);
    }
    if (self->type_line.p != NULL) {
        buf_put(&canon, "\n", 1);
        buf_put(&canon, self->type_line.p, self->type_line.len);
    }
    buf_put(&canon, "\n", 1);
    if (!pay.failed)
        buf_normalized(&canon, pay.p, pay.len);
    if (pay.failed || canon.failed) {
        PyErr_NoMemory();
        goto out;
    }
    int keyed = ensure_key(self, now_ms);
    if (keyed < 0)
        goto out;
    if (keyed > 0 || !self->prefix_plain) {
        result = Py_NewRef(Py_None);
        goto out;
    }
    hmac_hex(&self->key_inner, &self->key_outer, canon.p, canon.len, sig);

    /* The body: the page's keys in their order, identity fields forced in place, the rest
     * appended in inject.IdentityForcer's order. */
    buf_put(&b, "{", 1);
    int first = 1;
    for (int i = 0; i < n; i++) {
        int f = m[i].field;
        if (!first)
            buf_put(&b, ",", 1);
        first = 0;
        buf_quoted(&b, m[i].key, (size_t)m[i].klen);
        buf_put(&b, ":", 1);
        if (f <= F_CHANNEL)
            buf_quoted(&b, value[f], vlen[f]);
        else if (f == F_AUTH) {
            buf_put(&b, "\"", 1);
            buf_put(&b, self->prefix, self->prefix_len);
            buf_put(&b, "/", 1);
            buf_put(&b, sig, sizeof sig);
            buf_put(&b, "\"", 1);
        } else if (f == F_TIMESTAMP && m[i].kind != V_INT)
            buf_int(&b, now_ms);
        else if (m[i].kind == V_STR)
            buf_quoted(&b, m[i].val, (size_t)m[i].vlen);
        else
            buf_put(&b, m[i].val, (size_t)m[i].vlen);
    }
    for (int f = F_NAME; f <= F_CHANNEL; f++) {
        if (at[f] >= 0)
            continue;
        buf_put(&b, first ? "\"" : ",\"", first ? 1 : 2);
        first = 0;
        buf_str(&b, FIELD[f]);
        buf_put(&b, "\":", 2);
        buf_quoted(&b, value[f], vlen[f]);
    }
    if (at[F_TIMESTAMP] < 0) {
        buf_str(&b, ",\"timestamp\":");
        buf_int(&b, now_ms);
    }
    if (at[F_AUTH] < 0) {
        buf_str(&b, ",\"thirdPartAuthorization\":\"");
        buf_put(&b, self->prefix, self->prefix_len);
        buf_put(&b, "/", 1);
        buf_put(&b, sig, sizeof sig);
        buf_put(&b, "\"", 1);
    }
    buf_put(&b, "}", 1);
    if (b.failed)
        PyErr_NoMemory();
    else
        result = PyBytes_FromStringAndSize(b.p, (Py_ssize_t)b.len);
out:
    OPENSSL_cleanse(sig, sizeof sig);
    PyMem_Free(pay.heap);
    PyMem_Free(canon.heap);
    PyMem_Free(b.heap);
    return result;
}

static PyObject *FlatRewriter_repr(PyObject *self)
{
    FlatRewriter *r = (FlatRewriter *)self;
    return PyUnicode_FromFormat("FlatRewriter(tenant=%s, channel=%s, secret='**********')",
                                r->tenant.p ? r->tenant.p : "?",
                                r->channel.p ? r->channel.p : "?");
}

static PyObject *FlatRewriter_reduce(PyObject *self, PyObject *unused)
{
    PyErr_SetString(PyExc_TypeError, "FlatRewriter cannot be pickled (it holds a key)");
    return NULL;
}

static PyObject *FlatRewriter_reduce_ex(PyObject *self, PyObject *protocol)
{
    return FlatRewriter_reduce(self, NULL);
}

static PyMethodDef FlatRewriter_methods[] = {
    {"rewrite", (PyCFunction)(void (*)(void))FlatRewriter_rewrite, METH_FASTCALL, rewrite_doc},
    {"__reduce__", FlatRewriter_reduce, METH_NOARGS, NULL},
    {"__reduce_ex__", FlatRewriter_reduce_ex, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FlatRewriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway.chat._native.FlatRewriter",
    .tp_basicsize = sizeof(FlatRewriter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The injection rewrite for the usual body (see the module's source).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FlatRewriter_init,
    .tp_dealloc = (destructor)FlatRewriter_dealloc,
    .tp_repr = FlatRewriter_repr,
    .tp_methods = FlatRewriter_methods,
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gateway.chat._native",
    .m_doc = "The injection rewrite for the usual body, in native code.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *mod;
    if (PyType_Ready(&FlatRewriterType) < 0)
        return NULL;
    mod = PyModule_Create(&native_module);
    if (mod == NULL)
        return NULL;
    Py_INCREF(&FlatRewriterType);
    if (PyModule_AddObject(mod, "FlatRewriter", (PyObject *)&FlatRewriterType) < 0) {
        Py_DECREF(&FlatRewriterType);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
