/* The body of targets/recurrent.c, included once per ISA variant: GRAPHOPT_SUFFIX names the variant,
 * GRAPHOPT_ATTR is its target attribute. No include guard on purpose. */

#define GO_CAT2(a, b) a##_##b
#define GO_CAT(a, b) GO_CAT2(a, b)
#define GO_FN(name) GO_CAT(name, GRAPHOPT_SUFFIX)

/* Element-wise activations over n floats, in place; loops without calls or branches (selects only). */
GRAPHOPT_ATTR static void GO_FN(go_tanh)(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    float c = v < -9.0f ? -9.0f : (v > 9.0f ? 9.0f : v);
    const float x2 = c * c;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    float r = c * p / q;
    r = r < -1.0f ? -1.0f : (r > 1.0f ? 1.0f : r);
    const float a = v < 0.0f ? -v : v;
    r = a < 0.0004f ? v : r;
    x[i] = v != v ? v : r; /* NaN stays NaN */
  }
}

GRAPHOPT_ATTR static void GO_FN(go_sigmoid)(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = -x[i]; /* 1 / (1 + e^v) */
    float c = v < -103.97207708f ? -103.97207708f : (v > 88.72283935546875f ? 88.72283935546875f : v);
    const float t = c * 1.44269504088896341f + 0.5f;
    const float nf = __builtin_floorf(t); /* one vroundps where SSE4.1 is on */
    const float r = c - nf * 0.693359375f - nf * -2.12194440e-4f;
    float e = 1.9875691500e-4f;
    e = e * r + 1.3981999507e-3f;
    e = e * r + 8.3334519073e-3f;
    e = e * r + 4.1665795894e-2f;
    e = e * r + 1.6666665459e-1f;
    e = e * r + 5.0000001201e-1f;
    e = e * r * r + r + 1.0f;
    const int32_t ni = (int32_t)nf;
    const int32_t half = ni >> 1;
    int32_t b1 = (half + 127) << 23, b2 = (ni - half + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, 4);
    memcpy(&s2, &b2, 4);
    e = (e * s1) * s2;
    e = v > 88.72283935546875f ? __builtin_inff() : (v < -103.97207708f ? 0.0f : e);
    const float s = 1.0f / (1.0f + e);
    x[i] = v != v ? -v : s;
  }
}

GRAPHOPT_ATTR static void GO_FN(go_relu)(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] > 0.0f ? x[i] : (x[i] != x[i] ? x[i] : 0.0f);
}

GRAPHOPT_ATTR static void GO_FN(go_act)(int32_t code, float* x, int64_t n) {
  if (code == 0)
    GO_FN(go_sigmoid)(x, n);
  else if (code == 1)
    GO_FN(go_tanh)(x, n);
  else
    GO_FN(go_relu)(x, n);
}

GRAPHOPT_ATTR static void GO_FN(go_clip)(float* x, int64_t n, float clip) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] < -clip ? -clip : (x[i] > clip ? clip : x[i]);
}

/* out[0:ncols] = bias[0:ncols] + sum_k h[k] * rt[k, col0:col0+ncols] (rt rows of ld floats). */
GRAPHOPT_ATTR static void GO_FN(go_matvec)(const float* h, const float* rt, const float* bias, float* out,
                                           int64_t H, int64_t ld, int64_t col0, int64_t ncols) {
  memcpy(out, bias + col0, (size_t)ncols * sizeof(float));
  for (int64_t k = 0; k < H; ++k) {
    const float hk = h[k];
    const float* row = rt + k * ld + col0;
    for (int64_t j = 0; j < ncols; ++j) out[j] += hk * row[j];
  }
}

GRAPHOPT_ATTR int32_t GO_FN(graphopt_recurrence_f32)(
    int32_t kind, /* 0 RNN, 1 GRU, 2 LSTM */
    const float* xw, const float* rt_all, const float* rb_all, const float* p_all, const float* h0,
    const float* c0, const int32_t* lens, float* y, float* yh, float* yc, float* work_all, int64_t d, int64_t D,
    int64_t T, int64_t B, int64_t H, int32_t has_h0, int32_t has_c0, int32_t has_lens, int32_t reverse, int32_t lbr,
    int32_t input_forget, int32_t act_f, int32_t act_g, int32_t act_h, float clip) {
  const int64_t G = kind == 0 ? 1 : (kind == 1 ? 3 : 4);
  const int64_t GH = G * H;
  const float* rt = rt_all + d * H * GH;
  const float* rb = rb_all + d * GH;
  const float* p = p_all + d * 3 * H;
  float* g = work_all + d * (2 * GH + H); /* h R^T + Rb */
  float* pre = g + GH;                    /* gate pre-activations */
  float* rh = pre + GH;                   /* GRU (linear_before_reset=0): r * h */
  /* The state lives in Y_h and Y_c (this direction's rows), starting from the initial state or zeros. */
  if (has_h0)
    memcpy(yh + d * B * H, h0 + d * B * H, (size_t)(B * H) * sizeof(float));
  else
    memset(yh + d * B * H, 0, (size_t)(B * H) * sizeof(float));
  if (kind == 2 && has_c0)
    memcpy(yc + d * B * H, c0 + d * B * H, (size_t)(B * H) * sizeof(float));
  else
    memset(yc + d * B * H, 0, (size_t)(B * H) * sizeof(float));
  for (int64_t s = 0; s < T; ++s) {
    for (int64_t b = 0; b < B; ++b) {
      int64_t len = has_lens ? (int64_t)lens[b] : T;
      len = len < 0 ? 0 : (len > T ? T : len);
      float* yt = y + ((s * D + d) * B + b) * H;
      if (s >= len) { /* past this row's length: Y is zero there, the state is kept */
        memset(yt, 0, (size_t)H * sizeof(float));
        continue;
      }
      const int64_t t = reverse ? len - 1 - s : s;
      const float* x = xw + ((t * B + b) * D + d) * GH;
      float* h = yh + (d * B + b) * H;
      float* out = y + ((t * D + d) * B + b) * H;
      if (kind == 0) {
        GO_FN(go_matvec)(h, rt, rb, g, H, GH, 0, H);
        for (int64_t j = 0; j < H; ++j) pre[j] = x[j] + g[j];
        GO_FN(go_clip)(pre, H, clip);
        GO_FN(go_act)(act_f, pre, H);
        for (int64_t j = 0; j < H; ++j) h[j] = pre[j];
      } else if (kind == 1) {
        float* z = pre;
        float* r = pre + H;
        float* hh = pre + 2 * H;
        if (lbr) {
          GO_FN(go_matvec)(h, rt, rb, g, H, GH, 0, GH);
        } else {
          GO_FN(go_matvec)(h, rt, rb, g, H, GH, 0, 2 * H);
        }
        for (int64_t j = 0; j < 2 * H; ++j) pre[j] = x[j] + g[j];
        GO_FN(go_clip)(pre, 2 * H, clip);
        GO_FN(go_act)(act_f, pre, 2 * H);
        if (lbr) {
          for (int64_t j = 0; j < H; ++j) hh[j] = x[2 * H + j] + r[j] * g[2 * H + j];
        } else {
          for (int64_t j = 0; j < H; ++j) rh[j] = r[j] * h[j];
          GO_FN(go_matvec)(rh, rt, rb, g, H, GH, 2 * H, H); /* (r * h) Rh^T + Rbh, into g[0:H] */
          for (int64_t j = 0; j < H; ++j) hh[j] = x[2 * H + j] + g[j];
        }
        GO_FN(go_clip)(hh, H, clip);
        GO_FN(go_act)(act_g, hh, H);
        for (int64_t j = 0; j < H; ++j) h[j] = hh[j] + z[j] * (h[j] - hh[j]);
      } else {
        float* c = yc + (d * B + b) * H;
        float* gi = pre;
        float* go = pre + H;
        float* gf = pre + 2 * H;
        float* gc = pre + 3 * H;
        GO_FN(go_matvec)(h, rt, rb, g, H, GH, 0, GH);
        for (int64_t j = 0; j < GH; ++j) pre[j] = x[j] + g[j];
        for (int64_t j = 0; j < H; ++j) {
          gi[j] += p[j] * c[j];
          gf[j] += p[2 * H + j] * c[j];
        }
        GO_FN(go_clip)(gi, H, clip);
        GO_FN(go_act)(act_f, gi, H);
        if (input_forget) {
          for (int64_t j = 0; j < H; ++j) gf[j] = 1.0f - gi[j];
        } else {
          GO_FN(go_clip)(gf, H, clip);
          GO_FN(go_act)(act_f, gf, H);
        }
        GO_FN(go_clip)(gc, H, clip);
        GO_FN(go_act)(act_g, gc, H);
        for (int64_t j = 0; j < H; ++j) c[j] = gf[j] * c[j] + gi[j] * gc[j];
        for (int64_t j = 0; j < H; ++j) go[j] += p[H + j] * c[j];
        GO_FN(go_clip)(go, H, clip);
        GO_FN(go_act)(act_f, go, H);
        memcpy(rh, c, (size_t)H * sizeof(float));
        GO_FN(go_act)(act_h, rh, H);
        for (int64_t j = 0; j < H; ++j) h[j] = go[j] * rh[j];
      }
      memcpy(out, h, (size_t)H * sizeof(float));
    }
  }
  return 0;
}

#undef GO_FN
#undef GO_CAT
#undef GO_CAT2
