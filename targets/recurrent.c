/* graphopt's recurrence kernel: one direction of an ONNX RNN, GRU or LSTM over a whole sequence
 * (see targets/recurrent.py, which emits the call and everything around it).
 *
 * The input projection of every step (X W^T + Wb) is a GEMM computed before the call (xw); this kernel runs
 * the sequential part: per step and batch row, the recurrent matrix-vector product h R^T + Rb, the gate
 * activations and the state update, written straight into Y, Y_h and Y_c. Shapes (float32, row-major):
 *
 *   xw   [T, B, D, G*H]   projections, Wb added      rt   [D, H, G*H]   R transposed (per direction)
 *   rb   [D, G*H]         R's bias                   p    [D, 3*H]      LSTM peepholes (i, o, f), or zeros
 *   h0   [D, B, H]        initial hidden state       c0   [D, B, H]     initial cell state (LSTM)
 *   lens [B] int32        sequence lengths (clamped to [0, T]); has_h0/has_c0/has_lens = 0: zeros, zeros, T
 *   y    [T, D, B, H]     every step's hidden state, zero past a row's length
 *   yh   [D, B, H]        the last state             yc   [D, B, H]     the last cell state (LSTM)
 *   work [D, 2*G*H + H]   scratch
 *
 * Semantics follow ONNX and the lower-recurrent pass (tests compare both with ONNX Runtime): gate order
 * LSTM i o f c, GRU z r h; a reverse direction runs each row from its own last valid step down to 0; clip
 * bounds the inputs of the gate activations; GRU linear_before_reset=1 multiplies r into (h Rh + Rbh),
 * =0 multiplies r into h before Rh. Activations: 0 sigmoid, 1 tanh, 2 relu, as the float32 polynomials of
 * targets/fast_math.py (Eigen's rational tanh; Cody-Waite exp), written branch-free so the compiler
 * vectorizes them. The body is compiled twice from recurrent_body.h: for AVX2+FMA (target attribute, x86-64
 * only) and for the baseline ISA; the lowering picks the variant the target CPU runs. One call per
 * direction; the TIR caller runs the directions in parallel. Returns 0.
 */
#include <stdint.h>
#include <string.h>

#define GRAPHOPT_SUFFIX generic
#define GRAPHOPT_ATTR
#include "recurrent_body.h"
#undef GRAPHOPT_SUFFIX
#undef GRAPHOPT_ATTR

#if defined(__x86_64__) || defined(__i386__)
#define GRAPHOPT_SUFFIX avx2
#define GRAPHOPT_ATTR __attribute__((target("avx2,fma")))
#include "recurrent_body.h"
#undef GRAPHOPT_SUFFIX
#undef GRAPHOPT_ATTR
#endif
