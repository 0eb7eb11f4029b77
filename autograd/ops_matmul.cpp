// Matrix products: matmul (2x2, batched 3x3, rank>=3 x 2-D) and linear, forward and backward side by side.
// Every product, forward or backward, goes through run_gemm (one raw-kernel call site for a CUDA branch later).
//
// Gradients of C = op(A) op(B) with G = dL/dC (op = identity or transpose, A and B as stored):
//   dA = G op(B)^T        when A is stored as is      -> gemm(G, B, trans_b = !tb)            [M, K]
//   dA = op(B) G^T        when A is stored transposed -> gemm(B, G, trans_a = tb, trans_b)    [K, M]
//   dB = op(A)^T G        when B is stored as is      -> gemm(A, G, trans_a = !ta)            [K, N]
//   dB = G^T op(A)        when B is stored transposed -> gemm(G, A, trans_a, trans_b = ta)    [N, K]
// Each backward returns fresh gradient tensors (the engine accumulates them); a weight shared across a batch
// (rank>=3 a with trans_a times 2-D b) sums its per-batch gradients with the accumulate form (beta = 1).
#include <algorithm>

#include "autograd/ops.h"
#include "engine/dispatch.h"
#include "kernels/elementwise.h"
#include "kernels/gemm.h"

namespace cm {

namespace {

// C[batch] = op(A[batch]) op(B[batch]) + beta * C[batch] on contiguous f32 tensors of one device; strides in
// elements between batch entries (0 = the same matrix for every entry; never for C when batch > 1).
void run_gemm(const Tensor& c, const Tensor& a, const Tensor& b, int64_t batch, int64_t M, int64_t N, int64_t K,
              bool ta, bool tb, int64_t stride_a, int64_t stride_b, int64_t stride_c, float beta) {
  CM_CHECK(c.is_contiguous() && a.is_contiguous() && b.is_contiguous(), "run_gemm needs contiguous operands");
  const int64_t lda = ta ? M : K, ldb = tb ? K : N, ldc = N;
  CM_KERNEL(c.device(), gemm_strided_batched, c.f32(), ldc, stride_c, a.f32(), lda, stride_a, b.f32(), ldb, stride_b,
            batch, M, N, K, ta, tb, 1.0f, beta);
}

void check_operand(const char* op, const char* name, const Tensor& t) {
  CM_REQUIRE(t.defined(), op, ": ", name, " is undefined");
  CM_REQUIRE(t.dtype() == DType::F32, op, ": ", name, " must be f32, got ", dtype_name(t.dtype()), " ",
             shape_str(t.shape()));
}

// The gradient of a batch of products with one shared B (stride 0), A stored transposed [batch..., K, M], B stored
// [K, N] (or [N, K] when tb):
// dB = sum over the batch of op(A_b)^T G_b (or G_b^T op(A_b)), accumulated one batch entry after another.
Tensor shared_b_grad(const Tensor& a, const Tensor& g, int64_t batch, int64_t M, int64_t N, int64_t K, bool ta,
                     bool tb) {
  Tensor db = Tensor::empty(tb ? Shape{N, K} : Shape{K, N}, DType::F32, a.device());
  Tensor a3 = a.view({batch, K, M}), g3 = g.view({batch, M, N});  // A is stored transposed: [batch..., K, M]
  for (int64_t i = 0; i < batch; ++i) {
    Tensor ai = a3.select(0, i), gi = g3.select(0, i);  // contiguous slices of contiguous tensors
    const float beta = i == 0 ? 0.0f : 1.0f;
    if (!tb)
      run_gemm(db, ai, gi, 1, K, N, M, !ta, false, 0, 0, 0, beta);
    else
      run_gemm(db, gi, ai, 1, N, K, M, true, ta, 0, 0, 0, beta);
  }
  return db;
}

}  // namespace

Tensor matmul(const Tensor& a_in, const Tensor& b_in, bool ta, bool tb) {
  check_operand("matmul", "a", a_in);
  check_operand("matmul", "b", b_in);
  const std::string shapes = str("a ", shape_str(a_in.shape()), (ta ? " (transposed)" : ""), " and b ",
                                 shape_str(b_in.shape()), (tb ? " (transposed)" : ""));
  CM_REQUIRE(a_in.device() == b_in.device(), "matmul: a and b are on different devices: ", shapes);
  const int64_t ra = a_in.dim(), rb = b_in.dim();
  CM_REQUIRE(ra >= 2 && rb >= 2 && (rb == 2 || ra == rb) && rb <= 3,
             "matmul: unsupported ranks (2x2, 3x3 batched, or rank>=3 times 2-D): ", shapes);
  Tensor a = a_in.contiguous(), b = b_in.contiguous();

  // a [batch..., M, K] (or [..., K, M]), b [batch, K, N] or [K, N] (or transposed in the last two dims)
  const int64_t M = a.size(ta ? -1 : -2), K = a.size(ta ? -2 : -1);
  const int64_t Kb = b.size(tb ? -1 : -2), N = b.size(tb ? -2 : -1);
  CM_REQUIRE(K == Kb, "matmul: inner dimensions differ (", K, " vs ", Kb, "): ", shapes);
  Shape out_shape(a.shape().begin(), a.shape().end() - 2);
  int64_t batch = shape_numel(out_shape);
  if (rb == 3) CM_REQUIRE(a.size(0) == b.size(0), "matmul: batch sizes differ: ", shapes);
  out_shape.push_back(M);
  out_shape.push_back(N);

  // rank>=3 a times a 2-D b without trans_a: one product with the leading dims folded into M (bigger tiles).
  const bool fold = rb == 2 && !ta;
  const bool shared_b = rb == 2 && ta;  // batched products that all use the same b
  const int64_t Mg = fold ? M * batch : M, bg = fold ? 1 : batch;
  const int64_t sa = M * K, sb = shared_b ? 0 : K * N, sc = M * N;

  Tensor c = Tensor::empty(out_shape, DType::F32, a.device());
  run_gemm(c, a, b, bg, Mg, N, K, ta, tb, sa, sb, sc, 0.0f);

  const bool need_a = a_in.requires_grad(), need_b = b_in.requires_grad();
  return record("matmul", c, {a_in, b_in},
                [a = a.detach(), b = b.detach(), ta, tb, Mg, N, K, bg, sa, sb, sc, shared_b, need_a,
                 need_b](const Tensor& g_in) {
                  Tensor g = g_in.contiguous();
                  Tensor da, db;
                  if (need_a) {
                    da = Tensor::empty(a.shape(), DType::F32, a.device());
                    if (!ta)  // dA [M, K] = G [M, N] op(B)^T
                      run_gemm(da, g, b, bg, Mg, K, N, false, !tb, sc, sb, sa, 0.0f);
                    else  // dA [K, M] = op(B) [K, N] G^T
                      run_gemm(da, b, g, bg, K, Mg, N, tb, true, sb, sc, sa, 0.0f);
                  }
                  if (need_b) {
                    if (shared_b)
                      db = shared_b_grad(a, g, bg, Mg, N, K, ta, tb);
                    else {
                      db = Tensor::empty(b.shape(), DType::F32, b.device());
                      if (!tb)  // dB [K, N] = op(A)^T [K, M] G
                        run_gemm(db, a, g, bg, K, N, Mg, !ta, false, sa, sc, sb, 0.0f);
                      else  // dB [N, K] = G^T [N, M] op(A)
                        run_gemm(db, g, a, bg, N, K, Mg, true, ta, sc, sa, sb, 0.0f);
                    }
                  }
                  return grads{da, db};
                });
}

// y [R, out] = x [R, in] W^T + b, with R the product of x's leading dims. The bias is written into y first and
// the product accumulated onto it (beta = 1), so the bias add costs no extra pass over y.
Tensor linear(const Tensor& x_in, const Tensor& w_in, const Tensor& b_in) {
  check_operand("linear", "x", x_in);
  check_operand("linear", "w", w_in);
  const bool has_b = b_in.defined();
  if (has_b) check_operand("linear", "b", b_in);
  const std::string shapes = str("x ", shape_str(x_in.shape()), ", w ", shape_str(w_in.shape()),
                                 has_b ? ", b " + shape_str(b_in.shape()) : std::string());
  CM_REQUIRE(x_in.dim() >= 1 && w_in.dim() == 2, "linear: expects x [..., in] and w [out, in]: ", shapes);
  const int64_t in = w_in.size(1), out = w_in.size(0);
  CM_REQUIRE(x_in.size(-1) == in, "linear: x's last dim must equal w's in-features: ", shapes);
  CM_REQUIRE(!has_b || (b_in.dim() == 1 && b_in.size(0) == out), "linear: b must be [out] = [", out, "]: ", shapes);
  CM_REQUIRE(w_in.device() == x_in.device() && (!has_b || b_in.device() == x_in.device()),
             "linear: operands on different devices: ", shapes);
  Tensor x = x_in.contiguous(), w = w_in.contiguous(), b = has_b ? b_in.contiguous() : Tensor();
  const int64_t R = shape_numel(Shape(x.shape().begin(), x.shape().end() - 1));

  Shape out_shape = x.shape();
  out_shape.back() = out;
  Tensor y = Tensor::empty(out_shape, DType::F32, x.device());
  if (has_b && R > 0 && out > 0) {  // every row of y starts as b: a broadcast copy [out] -> [R, out]
    const int64_t shape[2] = {R, out}, strides[2] = {0, 1};
    CM_KERNEL(y.device(), broadcast_to, y.f32(), b.f32(), 2, shape, strides);
  }
  run_gemm(y, x, w, 1, R, out, in, false, true, 0, 0, 0, has_b ? 1.0f : 0.0f);

  const bool need_x = x_in.requires_grad(), need_w = w_in.requires_grad(), need_b = has_b && b_in.requires_grad();
  std::vector<Tensor> inputs = {x_in, w_in};
  if (has_b) inputs.push_back(b_in);
  return record("linear", y, inputs,
                [x = x.detach(), w = w.detach(), R, in, out, has_b, need_x, need_w, need_b](const Tensor& g_in) {
                  Tensor g = g_in.contiguous();  // [R, out]
                  Tensor dx, dw, db;
                  if (need_x) {  // dx [R, in] = g [R, out] W [out, in]
                    dx = Tensor::empty(x.shape(), DType::F32, x.device());
                    run_gemm(dx, g, w, 1, R, in, out, false, false, 0, 0, 0, 0.0f);
                  }
                  if (need_w) {  // dW [out, in] = g^T [out, R] x [R, in]
                    dw = Tensor::empty(w.shape(), DType::F32, w.device());
                    run_gemm(dw, g, x, 1, out, in, R, true, false, 0, 0, 0, 0.0f);
                  }
                  if (need_b) {  // db [1, out] = ones [1, R] g [R, out]: the column sums, by the same kernel
                    db = Tensor::empty({out}, DType::F32, g.device());
                    run_gemm(db, Tensor::ones({R}, DType::F32, g.device()), g, 1, 1, out, R, false, false, 0, 0, 0,
                             0.0f);
                  }
                  grads gs = {dx, dw};
                  if (has_b) gs.push_back(db);
                  return gs;
                });
}

}  // namespace cm
