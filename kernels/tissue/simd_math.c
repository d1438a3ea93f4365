/* exp, expm1 and log as straight-line arithmetic the C compiler can vectorise across voxels.
 *
 * glibc's vector exp/log (libmvec) is only used by GCC under -ffast-math, which the project does not
 * compile with (C must round like the NumPy reference where it claims to). These versions are used
 * only by the lookup-table cell step (an approximation already, ~1e-6 relative from the table), and
 * are accurate to a few ulp on the range a cell model uses (tests/test_tissue_tables.py measures
 * them against libm):
 *   exp:   x = k ln2 + r (Cody-Waite, |r| <= ln2/2), Taylor polynomial of degree 14 for exp(r), 2^k
 *          built in the exponent bits; results below DBL_MIN flush to 0 (x < -708.39).
 *   expm1: the degree-14 Taylor polynomial for |x| < ln2/2 (no cancellation), exp(x) - 1 beyond.
 *   log:   x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(s), s = (m-1)/(m+1), odd
 *          series to s^21; subnormal x scaled by 2^54 first.
 * Integer <-> double conversions use the 1.5 * 2^52 / 2^52 bias tricks so that no 64-bit integer
 * conversion instruction (AVX-512DQ only) is needed.
 */
#include <string.h>

static inline double twin_v_bits2d(int64_t b) {
    double d;
    memcpy(&d, &b, sizeof d);
    return d;
}

static inline int64_t twin_v_d2bits(double d) {
    int64_t b;
    memcpy(&b, &d, sizeof b);
    return b;
}

/* sum_{k=2}^{14} x^(k-2) / k!: exp(x) = 1 + x + x^2 tail(x), expm1(x) = x + x^2 tail(x); for
 * |x| <= ln2/2 the first omitted term is 0.35^13 / 15! < 2e-19 of the result */
static inline double twin_v_taylor_tail(double x) {
    double p = 1.14707455977297247e-11; /* 1/14! */
    p = p * x + 1.6059043836821613e-10;
    p = p * x + 2.08767569878680990e-09;
    p = p * x + 2.50521083854417188e-08;
    p = p * x + 2.75573192239858907e-07;
    p = p * x + 2.75573192239858907e-06;
    p = p * x + 2.48015873015873016e-05;
    p = p * x + 1.98412698412698413e-04;
    p = p * x + 1.38888888888888889e-03;
    p = p * x + 8.33333333333333333e-03;
    p = p * x + 4.16666666666666667e-02;
    p = p * x + 1.66666666666666667e-01;
    return p * x + 0.5;
}

static inline double twin_v_exp(double x) {
    const double shift = 6755399441055744.0; /* 1.5 * 2^52 */
    const double xc = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
    double kd = xc * 1.4426950408889634 + shift; /* round(x / ln2) in the low mantissa bits */
    const int64_t kb = twin_v_d2bits(kd);
    kd = kd - shift;
    double r = xc - kd * 6.93147180369123816490e-01; /* ln2 hi: 32 significant bits, product exact */
    r = r - kd * 1.90821492927058770002e-10;        /* ln2 lo */
    const double p = 1.0 + (r + (r * r) * twin_v_taylor_tail(r));
    const double s = twin_v_bits2d((kb - (int64_t)0x4338000000000000LL + 1023) << 52); /* 2^k */
    double res = p * s;
    res = x > 709.782712893383973 ? TWIN_INF : res;
    res = x < -708.3964185322641 ? 0.0 : res;
    return x == x ? res : x;
}

static inline double twin_v_expm1(double x) {
    const double small = x + (x * x) * twin_v_taylor_tail(x);
    const double big = twin_v_exp(x) - 1.0;
    return (x < 0.34657359027997264 && x > -0.34657359027997264) ? small : big;
}

static inline double twin_v_log(double x) {
    const int sub = x < 2.2250738585072014e-308; /* subnormal (or <= 0: handled at the end) */
    const double xs = x * (sub ? 18014398509481984.0 : 1.0); /* 2^54 */
    const int64_t b = twin_v_d2bits(xs);
    const int64_t eb = ((b >> 52) & 0x7ff) - 1023 - 54 * (int64_t)sub;
    double m = twin_v_bits2d((b & (int64_t)0x000fffffffffffffLL) | (int64_t)0x3ff0000000000000LL); /* [1, 2) */
    const int big = m > 1.4142135623730951;
    m = m * (big ? 0.5 : 1.0);
    /* exponent as a double without a 64-bit conversion: 2^52 + (e + 2048) read back, minus the bias */
    const double e = twin_v_bits2d((eb + big + 2048) | (int64_t)0x4330000000000000LL) - (4503599627370496.0 + 2048.0);
    const double s = (m - 1.0) / (m + 1.0);
    const double s2 = s * s;
    double p = 1.0 / 21.0;
    p = p * s2 + 1.0 / 19.0;
    p = p * s2 + 1.0 / 17.0;
    p = p * s2 + 1.0 / 15.0;
    p = p * s2 + 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    const double lm = 2.0 * s + (2.0 * s) * (s2 * p);
    double res = e * 6.93147180369123816490e-01 + (lm + e * 1.90821492927058770002e-10);
    res = x == TWIN_INF ? x : res;
    res = x == 0.0 ? -TWIN_INF : res;
    return ((x < 0.0) | (x != x)) ? TWIN_NAN : res;
}

static inline double tissue_rl_update_v(double y, double f, double b, double dt) {
    const double z = b * dt;
    const double phi = (z < 1e-8 && z > -1e-8) ? 1.0 + 0.5 * z : twin_v_expm1(z) / z;
    return y + dt * (f * phi);
}
