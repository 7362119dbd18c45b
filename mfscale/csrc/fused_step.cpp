// One training step of biased MF on the CPU: errors, gradients and the lazy Adam update in one op.
//
// The torch-ops step (mfscale.model.closed_form_grads + optim.LazyAdam) makes about a dozen passes over the
// batch and the touched rows: gather, dot, sort, CSR product, bincount, gather of the moments, elementwise
// update, scatter. Here the ratings are grouped by the row of the side with more touched rows (a counting
// sort; batch order within a row) and that table is streamed once: per row, its ratings' errors, its gradient
// in registers, its Adam update (see step_impl). Random rows are prefetched a few rows ahead.
//
// The arithmetic is optim._adam_rows's (SparseAdam's operation order), with the L2 term count * col_w * row
// added to the gradient before the moments. Sums run in a fixed order for a given thread count (the minor
// side's gradient is summed per thread, then over threads in order), so runs repeat bit for bit; another
// thread count changes the last bits of the minor side's gradient sums.
//
// Two model options (issue 24): without biases the bias column's gradient is 0 (plain MF: the caller holds the
// bias columns and the global bias at 0, so Adam leaves them there), and with max_norm > 0 every touched row's
// factor vector is renormalized in place before the step reads it, as nn.Embedding(max_norm=...) does.
//
// Two optimizers (``row_wise``): LazyAdam (moments m and v of the table's shape), or optim.RowRMSprop, whose state
// is two floats per row (the factor columns' and the bias column's second moment, passed as ``m``; ``v`` unused).
// Its row is 67 floats instead of Adam's 195, so ml-10m's user table and state fit the 32 MiB L3 (issue 22).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

// <a, b> over d values with 8 partial sums: a fixed-width vertical sum the compiler vectorizes without
// -ffast-math (a plain running sum must be kept in order, one lane at a time).
template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[c + j] * b[c + j];
  T tail = 0;
  for (; c < d; ++c) tail += a[c] * b[c];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// The batch's ratings indexed by one side's row: the touched rows (in order of first appearance, or in table
// order when many are touched), group j's ratings at positions start[j] .. start[j + 1]) of the side's grouped
// order, and each rating's group (``slot``, where step_impl counts). index_rows fills rows and start and leaves each
// touched row's mark holding its group; step_impl then reads the groups from the marks and sets them back to zero.
// ``mark`` (n_rows int32, all zero) is scratch kept by the caller between steps and left all zero again, so a sparse
// step costs O(batch), not O(table).
struct Groups {
  std::vector<int64_t> rows;
  std::vector<int32_t> start;
  std::vector<int32_t> slot;
};

// A rating as the major side's pass reads it (step_impl): its batch index, minor row, minor group, user-day row (0
// without user-day biases) and rating.
template <typename T>
struct Placed {
  int32_t k, mid, slot, day;
  T r;
};

// Every vector of ``g`` is allocated before the marks change (from here until step_impl clears them nothing may
// throw: the marks must end all zero).
void index_rows(Groups& g, const int32_t* ids, int64_t n, int32_t* mark, int64_t n_rows) {
  int64_t u = 0;
  for (int64_t k = 0; k < n; ++k) u += mark[ids[k]]++ == 0;  // counts first, without a branch per rating
  if (u * 16 >= n_rows) {
    // Many rows touched: visit them in table order (one scan of the marks), so their reads and writes
    // stream through memory instead of jumping at random.
    g.rows.resize(u + 1);  // within the reserve (nothing may throw here); the last slot is scratch
    int64_t j = 0;
    for (int64_t row = 0; row < n_rows; ++row) {  // no branch (with the count's: 1.2x the step, RESULTS session 16)
      g.rows[j] = row;
      j += mark[row] != 0;
    }
    g.rows.resize(u);
  } else {
    // Few: in order of first appearance (a listed row's count is negated, and restored below)
    for (int64_t k = 0; k < n; ++k) {
      int32_t& m = mark[ids[k]];
      if (m > 0) {
        g.rows.push_back(ids[k]);
        m = -m;
      }
    }
    for (int64_t j = 0; j < u; ++j) mark[g.rows[j]] = -mark[g.rows[j]];
  }
  g.start.resize(u + 1);
  int32_t pos = 0;
  for (int64_t j = 0; j < u; ++j) {
    g.start[j] = pos;
    pos += mark[g.rows[j]];
    mark[g.rows[j]] = static_cast<int32_t>(j);  // from here on: the row's group
  }
  g.start[u] = pos;
}

// Ask for a row's cache lines ahead of use: rows are read at random, one cache miss after another otherwise.
template <typename T>
__attribute__((always_inline)) inline void prefetch_row(const T* row, int64_t w, int rw) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < w * static_cast<int64_t>(sizeof(T)); off += 64) {
    if (rw) __builtin_prefetch(p + off, 1, 3);
    else __builtin_prefetch(p + off, 0, 3);
  }
}

// Calls f(std::integral_constant<int64_t, W>) with W the row width w (dim + 1) where the ops are compiled for it
// (dims 32, 64 and 128: their per-rating loops unrolled, RESULTS session 17), else W = 0, the loops for any width.
template <typename F>
auto with_width(int64_t w, F&& f) {
  switch (w) {
    case 33: return f(std::integral_constant<int64_t, 33>{});
    case 65: return f(std::integral_constant<int64_t, 65>{});
    case 129: return f(std::integral_constant<int64_t, 129>{});
    default: return f(std::integral_constant<int64_t, 0>{});
  }
}

constexpr int64_t kAhead = 4;  // rows (or ratings) ahead to prefetch: 4 beat 2, 6, 8 and 16; 2 and 8 again (RESULTS)
// Ratings ahead to prefetch a user-day bias row: those rows are nearly as many as the ratings (ml-10m: 1.7M rows,
// 28 MB beside the user table's 18 MB), so they come from memory, not the L3, and need more time in flight than the
// movies' rows: 12 ahead against 4 was 1.05x the op on ml-10m (op_variants beside a duplicate of the baseline at
// 0.999x; 8, 16 and 20 no better than 12; RESULTS, session 18).
constexpr int64_t kDayAhead = 12;

// nn.Embedding(max_norm=...)'s renorm (ATen's embedding_renorm_) of one row's factor vector (its first d
// columns): a vector with norm > max_norm is scaled by max_norm / (norm + 1e-7), computed in double.
template <typename T>
inline void renorm_row(T* p, int64_t d, double max_norm) {
  const double norm = std::sqrt(static_cast<double>(dot(p, p, d)));
  if (norm > max_norm) {
    const T scale = static_cast<T>(max_norm / (norm + 1e-7));
    for (int64_t c = 0; c < d; ++c) p[c] *= scale;
  }
}

struct AdamArgs {
  double step_size, beta1, beta2, eps;
  bool row_wise;  // RowRMSprop instead of Adam
};

// SparseAdam's update of one row, in optim._adam_rows's operation order.
template <typename T>
inline void adam_row(T* p, T* m, T* v, const T* grad, T count, const T* col_w, int64_t w, const AdamArgs& a,
                     const T* prior) {
  const T b1 = static_cast<T>(1 - a.beta1), b2 = static_cast<T>(1 - a.beta2);
  const T eps = static_cast<T>(a.eps), neg_step = static_cast<T>(-a.step_size);
  for (int64_t c = 0; c < w; ++c) {
    // the L2 pulls the factor columns toward the prior where there is one (implicit feedback), else toward 0
    const T pull = prior == nullptr || c == w - 1 ? p[c] : p[c] - prior[c];
    const T g = grad[c] + (count * col_w[c]) * pull;
    const T mc = m[c] + (g - m[c]) * b1;
    const T vc = v[c] + (g * g - v[c]) * b2;
    m[c] = mc;
    v[c] = vc;
    p[c] = p[c] + (mc / (std::sqrt(vc) + eps)) * neg_step;
  }
}

// RowRMSprop's update of one row (optim._row_rmsprop_rows's arithmetic, to rounding: this divides by the root
// where the torch ops multiply by a reciprocal): s holds the row's two second
// moments, of the mean square of the factor columns' gradient and of the bias column's.
template <typename T>
inline void row_rmsprop_row(T* p, T* s, const T* grad, T count, const T* col_w, int64_t w, const AdamArgs& a,
                            T* g, const T* prior) {
  const int64_t d = w - 1;
  if (prior) {  // implicit feedback: the factor columns' L2 pulls toward the prior, the bias column's toward 0
    for (int64_t c = 0; c < d; ++c) g[c] = grad[c] + (count * col_w[c]) * (p[c] - prior[c]);
    g[d] = grad[d] + (count * col_w[d]) * p[d];
  } else {
    for (int64_t c = 0; c < w; ++c) g[c] = grad[c] + (count * col_w[c]) * p[c];
  }
  const T b2 = static_cast<T>(1 - a.beta2), eps = static_cast<T>(a.eps), neg_step = static_cast<T>(-a.step_size);
  const T ms = dot(g, g, d) / static_cast<T>(d);
  const T vf = s[0] + (ms - s[0]) * b2;
  const T vb = s[1] + (g[d] * g[d] - s[1]) * b2;
  s[0] = vf;
  s[1] = vb;
  const T kf = neg_step / (std::sqrt(vf) + eps), kb = neg_step / (std::sqrt(vb) + eps);
  for (int64_t c = 0; c < d; ++c) p[c] = p[c] + g[c] * kf;
  p[d] = p[d] + g[d] * kb;
}

constexpr int64_t kGrain = 64;  // rows per task: a row is ~100 ns of work
// A streamed row's cost in ratings: 4 when a row took ~130 ns and a rating ~30 ns (RESULTS); 8 since session 18 made
// a rating cheaper (1.01-1.02x the op against 4 on ml-10m, in four op_variants runs of 6, 7, 8 and 10)
constexpr int64_t kRowCost = 8;

// One table's side of the step: its rows, Adam moments and step size.
template <typename T>
struct Side {
  T* p;
  T* m;
  T* v;
  const int32_t* ids;  // the batch's row ids on this side
  AdamArgs adam;
  // Implicit feedback (mfscale/implicit.py): per row, d values its factor columns' L2 pulls toward instead of 0 (the
  // user's implicit vector |N(u)|^-1/2 sum y_j); null: toward 0.
  const T* prior = nullptr;

  // The optimizer's update of table row ``row`` (parameters at ``p``) from its summed gradient; ``tmp``: w floats.
  inline void update(int64_t row, T* p, const T* grad, T count, const T* col_w, int64_t w, T* tmp) const {
    const T* z = prior ? prior + row * (w - 1) : nullptr;
    if (adam.row_wise) row_rmsprop_row(p, m + row * 2, grad, count, col_w, w, adam, tmp, z);
    else adam_row(p, m + row * w, v + row * w, grad, count, col_w, w, adam, z);
  }

  // Prefetch what update() will touch of row ``row``: the row, its optimizer state and its prior. always_inline, as
  // prefetch_row: GCC 12 -O3 finds that a function whose only effects are prefetches has none, and deletes the calls
  // it has not inlined by then. Without the attribute this member was deleted at both call sites (no prefetch of the
  // rows in the op's assembly: 28 prefetch instructions in the file instead of 44), and the step ran 1.3-1.4x slower
  // for it on ml-10m (RESULTS, session 16).
  __attribute__((always_inline)) inline void prefetch(int64_t row, int64_t w) const {
    prefetch_row(p + row * w, w, 1);
    if (adam.row_wise) {
      __builtin_prefetch(m + row * 2, 1, 3);
    } else {
      prefetch_row(m + row * w, w, 1);
      prefetch_row(v + row * w, w, 1);
    }
    if (prior) prefetch_row(prior + row * (w - 1), w - 1, 0);
  }
};

// The user-day biases (mfscale/daybias.py) where the job has them: rows [bias, state, 1 / ratings, scratch] and each
// rating's row. The step fits rating - bias (read as the rating is, prefetched with it), and the biases take their
// step from its errors (users major: each user's right after its ratings; else at the op's end, day_step_impl): one
// op instead of three passes over the batch (a gather, the step, their step).
template <typename T>
struct Days {
  T* table = nullptr;  // null: no user-day biases
  const int32_t* rows = nullptr;
  int64_t missing = 0;
  double step_size = 0, l2 = 0;
};

// A bias row [value, RMSprop state, 1 / training ratings, scratch] (the user-day biases', the time-aware biases'):
// a rating's share of its gradient (``a`` = its error x scale, plus its share of the L2 from the old value) into the
// scratch column (NaN: not touched yet in this step).
template <typename T>
inline void bias_add(T* row, T a, T l2) {
  if (std::isnan(row[3])) row[3] = T(0);
  row[3] += a + row[2] * l2 * row[0];
}

// A touched bias row takes its RMSprop step, once (its scratch back to NaN; already stepped: nothing).
template <typename T>
inline void bias_update(T* row, T size, T b2, T eps) {
  if (std::isnan(row[3])) return;
  const T g = row[3];
  row[3] = std::numeric_limits<T>::quiet_NaN();
  const T s = row[1] + (g * g - row[1]) * (T(1) - b2);
  row[1] = s;
  row[0] -= size * g / (std::sqrt(s) + eps);
}

// A rating's share of the gradient of its day, row ``r`` (the "missing" row never moves).
template <typename T>
inline void day_add(const Days<T>& days, int64_t r, T a) {
  if (r != days.missing) bias_add(days.table + r * 4, a, static_cast<T>(days.l2));
}

// A rating's day, row ``r``, takes its RMSprop step, once (an earlier rating of the same day may have stepped it).
template <typename T>
inline void day_update(const Days<T>& days, int64_t r, T b2, T eps) {
  if (r != days.missing) bias_update(days.table + r * 4, static_cast<T>(days.step_size), b2, eps);
}

// The user-day biases' step (mfscale/daybias.py, DayBias.update) from a batch's errors, at fused_step's end where
// movies are the major side (users major: in the pass, per user): day_add for every rating in batch order (the
// gradient summed into each touched row's scratch, from the old bias), then day_update, each touched row once. As
// torch ops (a unique, an index_add, five gathers and scatters) it cost half a step on ml-10m.
template <typename T>
void day_step_impl(const Days<T>& days, const T* err, int64_t n, double scale, T b2, T eps) {
  constexpr int64_t kDayStepAhead = 16;  // the rows are random and in memory, not cache: more misses in flight
  const T sc = static_cast<T>(scale);
  for (int64_t k = 0; k < n; ++k) {
    if (k + kDayStepAhead < n) prefetch_row(days.table + int64_t{days.rows[k + kDayStepAhead]} * 4, 4, 1);
    day_add(days, days.rows[k], err[k] * sc);
  }
  for (int64_t k = 0; k < n; ++k) {
    if (k + kDayStepAhead < n) prefetch_row(days.table + int64_t{days.rows[k + kDayStepAhead]} * 4, 4, 1);
    day_update(days, days.rows[k], b2, eps);
  }
}

// The major side (more touched rows) is streamed row by row: for each of its rows, the errors of its ratings,
// its gradient summed in registers and its Adam update, once. The same loop adds each rating's share of the
// minor side's gradient (from the major row before its update) into a per-thread buffer, kept in cache since
// the minor side has the fewer rows; the minor rows are updated afterwards from those buffers, summed in thread
// order. Every prediction reads old rows only: a major row is updated after its own ratings, minor rows last.
//
// W > 0: the row width (dim + 1) as a compile-time constant (with_width): the per-rating loops over
// a row then have a known trip count, are unrolled and vectorized without runtime alias checks and remainder loops,
// and the major row's gradient sum lives in a stack array. Same operations in the same order, so the same bits
// (an epoch of ml-10m byte-equal); 1.14-1.31x the job's step on ml-10m (RESULTS, session 17). W = 0: any width.
template <typename T, int64_t W = 0>
std::vector<double> step_impl(Side<T> user_side, Side<T> item_side, int64_t n_users, int64_t n_items, int64_t w_rt,
                              int64_t n, const T* r, double global_bias, double scale, const T* cw,
                              int32_t* mark_u, int32_t* mark_i, at::Tensor& work, double max_norm, bool biases,
                              const Days<T>& days, T* err_out) {
  const int64_t w = W ? W : w_rt;
  const int64_t d = w - 1;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // All the memory of the grouping first: nothing may throw while the marks hold groups (they must end all zero).
  Groups gu, gi;
  // Contiguous parts of the batch, one per thread: how the major side's ratings are grouped below
  const int64_t parts = threads;
  for (Groups* g : {&gu, &gi}) {
    g->rows.reserve(n + 1);  // + 1: index_rows's table-order scan writes one slot past its count
    g->start.reserve(n + 1);
    if (parts > 2) g->slot.resize(n);
  }
  // The ratings in the major side's order with their own values (placed[s]: the s-th's batch index, minor row, minor
  // group, day row and rating), which the pass below reads in sequence: read at random there, each was a likely L2
  // miss on the way to the address of a row to prefetch (1.10-1.15x the job's step on ml-10m, RESULTS session 16).
  // One record per rating, so placing one is one cache line written, not five. Not zero-filled: every one is placed.
  std::unique_ptr<Placed<T>[]> placed(new Placed<T>[n]);
  // Per part, its next position in each major group (with more than two parts, first its count there)
  std::unique_ptr<int32_t[]> part_next(new int32_t[std::max<int64_t>(parts, 2) * (n + 1)]);
  auto part_begin = [&](int64_t part) { return n * part / parts; };

  at::parallel_for(0, 2, 1, [&](int64_t b, int64_t e) {  // the two sides at once (their own marks)
    for (int64_t side = b; side < e; ++side) {
      if (side == 0) index_rows(gu, user_side.ids, n, mark_u, n_users);
      else index_rows(gi, item_side.ids, n, mark_i, n_items);
    }
  });
  const T bias_grad = biases ? T(1) : T(0);  // plain MF: the bias column's gradient is exactly 0
  const bool users_major = gu.rows.size() >= gi.rows.size();
  Groups& gmaj = users_major ? gu : gi;
  Groups& gmin = users_major ? gi : gu;
  const Side<T>& maj = users_major ? user_side : item_side;
  const Side<T>& mnr = users_major ? item_side : user_side;
  int32_t* mark_maj = users_major ? mark_u : mark_i;
  int32_t* mark_min = users_major ? mark_i : mark_u;
  const int64_t nmaj = static_cast<int64_t>(gmaj.rows.size()), nmin = static_cast<int64_t>(gmin.rows.size());
  // The major side's ratings grouped by row, in batch order within a row, placed with their values (sequential reads,
  // each part writing into its own positions) on all threads: serial, with the slots of index_rows and a gather
  // after it, this was 0.95-0.97x the op on ml-10m (RESULTS session 18).
  if (parts <= 2) {
    // One or two parts: the first half of the batch fills each group from its start up, in batch order, and the
    // second from its end down, in reverse batch order, so batch order within every group with nothing counted first
    // (the counting below: 0.96-0.99x the op on ml-10m).
    int32_t* front = part_next.get();
    int32_t* back = part_next.get() + (n + 1);
    const int64_t half = (n + 1) / 2;
    at::parallel_for(0, 2, 1, [&](int64_t hb, int64_t he) {
      for (int64_t h = hb; h < he; ++h) {
        if (h == 0) {
          std::copy(gmaj.start.begin(), gmaj.start.begin() + nmaj, front);
          for (int64_t k = 0; k < half; ++k) {
            const int32_t s = front[mark_maj[maj.ids[k]]]++;
            placed[s] = {static_cast<int32_t>(k), mnr.ids[k], mark_min[mnr.ids[k]], days.table ? days.rows[k] : 0,
                         r[k]};
          }
        } else {
          std::copy(gmaj.start.begin() + 1, gmaj.start.begin() + nmaj + 1, back);
          for (int64_t k = n - 1; k >= half; --k) {
            const int32_t s = --back[mark_maj[maj.ids[k]]];
            placed[s] = {static_cast<int32_t>(k), mnr.ids[k], mark_min[mnr.ids[k]], days.table ? days.rows[k] : 0,
                         r[k]};
          }
        }
      }
    });
    at::parallel_for(0, std::max(nmaj, nmin), 4096, [&](int64_t b, int64_t e) {  // the marks back to zero
      for (int64_t j = b; j < e; ++j) {
        if (j < nmaj) mark_maj[gmaj.rows[j]] = 0;
        if (j < nmin) mark_min[gmin.rows[j]] = 0;
      }
    });
  } else {
    // More parts: a counting sort. Each part reads its ratings' groups from the marks of both sides and counts its
    // ratings per major group;
    at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
      for (int64_t part = pb; part < pe; ++part) {
        int32_t* count = part_next.get() + part * (n + 1);
        std::fill(count, count + nmaj, 0);
        for (int64_t k = part_begin(part), end = part_begin(part + 1); k < end; ++k) {
          const int32_t j = mark_maj[maj.ids[k]];
          gmaj.slot[k] = j;
          ++count[j];
          gmin.slot[k] = mark_min[mnr.ids[k]];
        }
      }
    });
    // each part's ratings of group j then start after those of the parts before it (so batch order within a group),
    // and the marks go back to zero;
    at::parallel_for(0, std::max(nmaj, nmin), 4096, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        if (j < nmaj) {
          int32_t pos = gmaj.start[j];
          for (int64_t part = 0; part < parts; ++part) {
            int32_t& c = part_next[part * (n + 1) + j];
            const int32_t here = c;
            c = pos;
            pos += here;
          }
          mark_maj[gmaj.rows[j]] = 0;
        }
        if (j < nmin) mark_min[gmin.rows[j]] = 0;
      }
    });
    // and each part places its ratings and their values (sequential reads, writes into its own positions).
    at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
      for (int64_t part = pb; part < pe; ++part) {
        int32_t* next = part_next.get() + part * (n + 1);
        for (int64_t k = part_begin(part), end = part_begin(part + 1); k < end; ++k) {
          const int32_t s = next[gmaj.slot[k]]++;
          placed[s] = {static_cast<int32_t>(k), mnr.ids[k], gmin.slot[k], days.table ? days.rows[k] : 0, r[k]};
        }
      }
    });
  }
  // max_norm: every touched row renormalized before anything reads it. The minor side's rows (read by many
  // major rows) first, here; each major row in the pass below, just before its own ratings, the only reads of
  // it (a separate pass over the major rows, cache misses and all, made the step 1.4x slower on ml-10m).
  if (max_norm > 0) {
    at::parallel_for(0, static_cast<int64_t>(gmin.rows.size()), 256, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) renorm_row(mnr.p + gmin.rows[j] * w, d, max_norm);
    });
  }
  if (work.numel() < threads * nmin * w) work.resize_({threads * nmin * w});
  T* bufs = work.data_ptr<T>();
  std::vector<uint8_t> used(threads * nmin, 0);  // per thread: which minor rows its buffer holds
  // Each rating's error, written below for every rating (no zero fill); into the caller's tensor where it asks for
  // them (the time-aware biases step from them, mfscale/timebias.py)
  std::unique_ptr<T[]> err_buf(err_out ? nullptr : new T[n]);
  T* err = err_out ? err_out : err_buf.get();
  const T gb = static_cast<T>(global_bias), sc = static_cast<T>(scale);
  // Chunk boundaries of equal work, a row costing about kRowCost ratings (its random read-modify-write of the
  // row and two moments against a rating's two row products): equal row counts left one thread waiting on the
  // other at the end of the pass whenever its rows held more ratings.
  std::vector<int64_t> bound(threads + 1, nmaj);
  const int64_t total = kRowCost * nmaj + n;
  for (int64_t t = 0; t < threads; ++t) {
    int64_t lo = 0, hi = nmaj;  // the first row j with kRowCost * j + start[j] >= t's share
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (kRowCost * mid + gmaj.start[mid] < total * t / threads) lo = mid + 1;
      else hi = mid;
    }
    bound[t] = lo;
  }

  // Users major (the usual case): each user's day biases take their step in the pass, right after the user's own
  // ratings (a day belongs to one user, so to one thread; its ratings are summed in batch order, as below).
  const bool days_here = days.table && users_major;
  const T d_b2 = static_cast<T>(maj.adam.beta2), d_eps = static_cast<T>(maj.adam.eps);
  // One chunk of major rows per buffer, whatever OpenMP runtime and team size run them: chunk t owns buffer t.
  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t tid = t_begin; tid < t_end; ++tid) {
      const int64_t b = bound[tid], e = bound[tid + 1];
      T* buf = bufs + tid * nmin * w;
      uint8_t* mine = used.data() + tid * nmin;
      std::vector<T> acc_v(W ? 0 : w), tmp_v(W ? 0 : w);  // any width: on the heap
      alignas(64) T acc_s[W ? W : 1], tmp_s[W ? W : 1];
      T* acc = W ? acc_s : acc_v.data();
      T* tmp = W ? tmp_s : tmp_v.data();
      const int32_t last = gmaj.start[e];  // end of this thread's ratings
      for (int64_t j = b; j < e; ++j) {
        if (j + kAhead < e) maj.prefetch(gmaj.rows[j + kAhead], w);
        T* p = maj.p + gmaj.rows[j] * w;
        if (max_norm > 0) renorm_row(p, d, max_norm);
        for (int64_t c = 0; c < w; ++c) acc[c] = 0;
        const int32_t end = gmaj.start[j + 1];
        for (int32_t s = gmaj.start[j]; s < end; ++s) {
          const Placed<T>& o = placed[s];
          const int32_t k = o.k;
          if (s + kAhead < last) {  // a few ratings ahead, across row boundaries: rows hold ~1-10 ratings
            const int32_t ahead = s + kAhead;
            prefetch_row(mnr.p + placed[ahead].mid * w, w, 0);
            prefetch_row(buf + placed[ahead].slot * w, w, 1);
          }
          if (days.table && s + kDayAhead < last)
            prefetch_row(days.table + int64_t{placed[s + kDayAhead].day} * 4, 4, 0);
          const T* q = mnr.p + o.mid * w;
          const T* ru = users_major ? p : q;
          const T* ri = users_major ? q : p;
          const T x = ((gb + dot(ru, ri, d)) + ru[d]) + ri[d];
          const T ek = x - (days.table ? o.r - days.table[int64_t{o.day} * 4] : o.r);
          err[k] = ek;
          const T a = ek * sc;
          if (days_here) day_add(days, o.day, a);
          for (int64_t c = 0; c < d; ++c) acc[c] += a * q[c];
          acc[d] += a * bias_grad;
          const int32_t mj = o.slot;
          T* g = buf + mj * w;
          if (!mine[mj]) {
            mine[mj] = 1;
            for (int64_t c = 0; c < w; ++c) g[c] = 0;
          }
          for (int64_t c = 0; c < d; ++c) g[c] += a * p[c];
          g[d] += a * bias_grad;
        }
        if (days_here) {  // this user's days are this thread's alone, and still in cache: step them now
          for (int32_t s = gmaj.start[j]; s < end; ++s) day_update(days, placed[s].day, d_b2, d_eps);
        }
        const T count = static_cast<T>(end - gmaj.start[j]);
        maj.update(gmaj.rows[j], p, acc, count, cw, w, tmp);
      }
    }
  });
  at::parallel_for(0, nmin, kGrain, [&](int64_t b, int64_t e) {
    std::vector<T> grad(w), tmp(w);
    for (int64_t j = b; j < e; ++j) {
      if (j + kAhead < e) mnr.prefetch(gmin.rows[j + kAhead], w);
      bool first = true;
      for (int64_t t = 0; t < threads; ++t) {
        if (!used[t * nmin + j]) continue;
        const T* g = bufs + (t * nmin + j) * w;
        for (int64_t c = 0; c < w; ++c) grad[c] = first ? g[c] : grad[c] + g[c];
        first = false;
      }
      const int64_t row = gmin.rows[j];
      const T count = static_cast<T>(gmin.start[j + 1] - gmin.start[j]);
      mnr.update(row, mnr.p + row * w, grad.data(), count, cw, w, tmp.data());
    }
  });
  if (days.table && !users_major) {  // the biases' values were only read above: their step sees the old values
    day_step_impl<T>(days, err, n, scale, d_b2, d_eps);
  }
  // Summed in blocks of fixed size, then the blocks in order: the same sums for any thread count
  constexpr int64_t kSumBlock = 4096;
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<double> coef_b(blocks), sse_b(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      double c = 0, q = 0;
      for (int64_t k = blk * kSumBlock, end = std::min(n, k + kSumBlock); k < end; ++k) {
        c += static_cast<T>(err[k] * sc);
        q += static_cast<double>(err[k]) * err[k];
      }
      coef_b[blk] = c;
      sse_b[blk] = q;
    }
  });
  double coef_sum = 0, sse = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    coef_sum += coef_b[blk];
    sse += sse_b[blk];
  }
  return {coef_sum, sse};
}

// The time ops' int64 ids (fused_step and sgd_step: ids_int32)
void check_ids(const at::Tensor& ids, int64_t n_rows, const char* what, const char* op) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.dim() == 1,
              op, ": ", what, " ids must be a contiguous 1-D int64 tensor");
  if (ids.numel() == 0) return;
  const int64_t* p = ids.data_ptr<int64_t>();
  int64_t lo = p[0], hi = p[0];
  for (int64_t k = 1; k < ids.numel(); ++k) {
    lo = p[k] < lo ? p[k] : lo;
    hi = p[k] > hi ? p[k] : hi;
  }
  TORCH_CHECK(lo >= 0 && hi < n_rows, op, ": ", what, " id out of range [0, ", n_rows, ")");
}

// One id argument of fused_step or sgd_step: the caller's tensor and the table it indexes.
struct IdArg {
  const at::Tensor* ids;
  int64_t n_rows;
  const char* what;
};

// fused_step and sgd_step index rows with int32 ids (the job's shards and batches hold int32, and the op's gathered
// copies take half the memory of int64): each argument as a contiguous int32 tensor, the caller's own where it is one
// (the job's: no conversion), else converted from int64, once every id is known to lie in [0, n_rows). One parallel
// pass over all of them, where three serial scans (4% of the op on ml-10m) followed the job's three int64 copies
// (RESULTS, session 18).
std::vector<at::Tensor> ids_int32(const std::vector<IdArg>& args, const char* op) {
  constexpr int64_t kIdChunk = 16384;
  struct Chunk {
    size_t arg;
    int64_t begin, end;
  };
  std::vector<at::Tensor> out;
  std::vector<Chunk> chunks;
  for (size_t a = 0; a < args.size(); ++a) {
    const at::Tensor& ids = *args[a].ids;
    TORCH_CHECK((ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong) && ids.device().is_cpu() &&
                    ids.is_contiguous() && ids.dim() == 1,
                op, ": ", args[a].what, " ids must be a contiguous 1-D int32 or int64 CPU tensor");
    TORCH_CHECK(args[a].n_rows <= std::numeric_limits<int32_t>::max(), op, ": ", args[a].what,
                " table has more rows than int32 ids can index");
    out.push_back(ids.scalar_type() == at::kInt ? ids : at::empty({ids.numel()}, ids.options().dtype(at::kInt)));
    for (int64_t b = 0; b < ids.numel(); b += kIdChunk) chunks.push_back({a, b, std::min(ids.numel(), b + kIdChunk)});
  }
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<int64_t> lo(nc), hi(nc);
  at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& ids = *args[ch.arg].ids;
      int64_t l = std::numeric_limits<int64_t>::max(), h = std::numeric_limits<int64_t>::min();
      if (ids.scalar_type() == at::kInt) {
        const int32_t* p = ids.data_ptr<int32_t>();
        for (int64_t k = ch.begin; k < ch.end; ++k) {
          l = p[k] < l ? p[k] : l;
          h = p[k] > h ? p[k] : h;
        }
      } else {  // int64: narrowed as it is scanned; the range check below rejects any id that did not fit
        const int64_t* p = ids.data_ptr<int64_t>();
        int32_t* q = out[ch.arg].data_ptr<int32_t>();
        for (int64_t k = ch.begin; k < ch.end; ++k) {
          l = p[k] < l ? p[k] : l;
          h = p[k] > h ? p[k] : h;
          q[k] = static_cast<int32_t>(p[k]);
        }
      }
      lo[c] = l;
      hi[c] = h;
    }
  });
  for (int64_t c = 0; c < nc; ++c) {
    const IdArg& a = args[chunks[c].arg];
    TORCH_CHECK(lo[c] >= 0 && hi[c] < a.n_rows, op, ": ", a.what, " id out of range [0, ", a.n_rows, ")");
  }
  return out;
}

// The user-day bias arguments of either op, when the job has them (a non-empty table): the table's layout (rows of
// [bias, state, 1 / n, scratch]) and one row per rating (their range: ids_int32).
void check_days(const at::Tensor& day_table, const at::Tensor& day_rows, at::ScalarType dtype, int64_t n,
                const char* op) {
  TORCH_CHECK(day_table.device().is_cpu() && day_table.is_contiguous() && day_table.scalar_type() == dtype &&
                  day_table.dim() == 2 && day_table.size(1) == 4,
              op, ": the user-day biases must be a contiguous CPU (rows, 4) tensor of the tables' dtype");
  TORCH_CHECK(day_rows.numel() == n, op, ": one user-day row per rating");
}

// The ids of a fused_step or sgd_step call as int32 (ids_int32): [user, item] and, with user-day biases, each
// rating's day row.
std::vector<at::Tensor> op_ids(const at::Tensor& user, int64_t n_users, const at::Tensor& item, int64_t n_items,
                               const at::Tensor& day_table, const at::Tensor& day_rows, at::ScalarType dtype,
                               const char* op) {
  std::vector<IdArg> args{{&user, n_users, "user"}, {&item, n_items, "item"}};
  if (day_table.numel() > 0) {
    check_days(day_table, day_rows, dtype, user.numel(), op);
    args.push_back({&day_rows, day_table.size(0), "day"});
  }
  return ids_int32(args, op);
}

// The user-day biases of an op call: none (an empty table), or the table, each rating's row and the "missing" row
// (the last: a day without training ratings, never stepped).
template <typename T>
Days<T> days_of(const at::Tensor& day_table, const at::Tensor& day_rows) {
  Days<T> days;
  if (day_table.numel() > 0) {
    days.table = day_table.data_ptr<T>();
    days.rows = day_rows.data_ptr<int32_t>();
    days.missing = day_table.size(0) - 1;
  }
  return days;
}

// Returns [sum of coef (the global bias's gradient), sum of squared errors] as a float64 tensor; ``errors``
// (empty, or one per rating) receives each rating's error, prediction - target.
at::Tensor fused_step(at::Tensor users, at::Tensor items, at::Tensor m_u, at::Tensor v_u, at::Tensor m_i,
                      at::Tensor v_i, at::Tensor user, at::Tensor item, at::Tensor rating, double global_bias,
                      double scale, at::Tensor col_w, double step_size_u, double step_size_i, double beta1,
                      double beta2, double eps, at::Tensor mark_u, at::Tensor mark_i, at::Tensor work,
                      double max_norm, bool biases, bool row_wise, at::Tensor day_table,
                      at::Tensor day_rows, double day_step_size, double day_l2, at::Tensor errors,
                      at::Tensor user_prior) {
  const auto dtype = users.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "fused_step: tables must be float32 or float64");
  for (const at::Tensor* t : {&users, &items, &m_u, &m_i, &rating, &col_w, &work}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == dtype,
                "fused_step: tables, moments, ratings, weights and work memory must be contiguous CPU tensors of "
                "one dtype");
  }
  const int64_t w = users.size(1);
  TORCH_CHECK(users.dim() == 2 && items.dim() == 2 && items.size(1) == w && col_w.numel() == w,
              "fused_step: tables must be 2-D with equal widths");
  if (row_wise) {
    TORCH_CHECK(m_u.dim() == 2 && m_u.size(0) == users.size(0) && m_u.size(1) == 2 && m_i.dim() == 2 &&
                    m_i.size(0) == items.size(0) && m_i.size(1) == 2,
                "fused_step: row-wise state must be (table rows, 2)");
  } else {
    for (const at::Tensor* t : {&v_u, &v_i})
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == dtype,
                  "fused_step: moments must be contiguous CPU tensors of the tables' dtype");
    TORCH_CHECK(m_u.sizes() == users.sizes() && v_u.sizes() == users.sizes() && m_i.sizes() == items.sizes() &&
                    v_i.sizes() == items.sizes(),
                "fused_step: moments must have their table's shape");
  }
  TORCH_CHECK(mark_u.scalar_type() == at::kInt && mark_i.scalar_type() == at::kInt &&
                  mark_u.is_contiguous() && mark_i.is_contiguous() && mark_u.numel() == users.size(0) &&
                  mark_i.numel() == items.size(0),
              "fused_step: marks must be contiguous int32, one per table row");
  TORCH_CHECK(work.dim() == 1, "fused_step: work memory must be 1-D");
  TORCH_CHECK(user.numel() == item.numel() && rating.numel() == user.numel(),
              "fused_step: user, item and rating must have equal lengths");
  TORCH_CHECK(user.numel() < (int64_t{1} << 31), "fused_step: batch too large");
  const int64_t n = user.numel();
  const std::vector<at::Tensor> ids =
      op_ids(user, users.size(0), item, items.size(0), day_table, day_rows, dtype, "fused_step");
  TORCH_CHECK(errors.numel() == 0 || (errors.numel() == n && errors.is_contiguous() && errors.device().is_cpu() &&
                                      errors.scalar_type() == dtype),
              "fused_step: errors must be empty or one contiguous CPU value per rating, of the tables' dtype");
  TORCH_CHECK(user_prior.numel() == 0 ||
                  (user_prior.dim() == 2 && user_prior.size(0) == users.size(0) && user_prior.size(1) == w - 1 &&
                   user_prior.is_contiguous() && user_prior.device().is_cpu() && user_prior.scalar_type() == dtype),
              "fused_step: user_prior must be empty or a contiguous CPU (user rows, dim) tensor of the tables' dtype");
  std::vector<double> out;
  AT_DISPATCH_FLOATING_TYPES(dtype, "fused_step", [&] {
    Days<scalar_t> days = days_of<scalar_t>(day_table, ids.size() > 2 ? ids[2] : day_rows);
    days.step_size = day_step_size;
    days.l2 = day_l2;
    scalar_t* vu = row_wise ? nullptr : v_u.data_ptr<scalar_t>();  // RowRMSprop has no second tensor
    scalar_t* vi = row_wise ? nullptr : v_i.data_ptr<scalar_t>();
    Side<scalar_t> su{users.data_ptr<scalar_t>(), m_u.data_ptr<scalar_t>(), vu, ids[0].data_ptr<int32_t>(),
                      {step_size_u, beta1, beta2, eps, row_wise}};
    if (user_prior.numel()) su.prior = user_prior.data_ptr<scalar_t>();
    Side<scalar_t> si{items.data_ptr<scalar_t>(), m_i.data_ptr<scalar_t>(), vi, ids[1].data_ptr<int32_t>(),
                      {step_size_i, beta1, beta2, eps, row_wise}};
    out = with_width(w, [&](auto width) {
      return step_impl<scalar_t, decltype(width)::value>(
          su, si, users.size(0), items.size(0), w, n, rating.data_ptr<scalar_t>(), global_bias, scale,
          col_w.data_ptr<scalar_t>(), mark_u.data_ptr<int32_t>(), mark_i.data_ptr<int32_t>(), work, max_norm, biases,
          days, errors.numel() ? errors.data_ptr<scalar_t>() : nullptr);
    });
  });
  return at::tensor(out, at::TensorOptions().dtype(at::kDouble));
}

// --optim.optimizer sgd: one SGD update per rating (Funk's and Koren's SGD, the algorithm of cornac's MF and, per
// block, LIBMF's), in batch order: with e = prediction - rating,
//   p_u -= lr (e q_i + reg_f p_u),  q_i -= lr (e p_u + reg_f q_i)        (both from the old rows)
//   b_u -= lr (e + reg_b b_u),      b_i -= lr (e + reg_b b_i)            (biases on)
//   b_ud -= lr (e + reg_day / n_ud b_ud)                                  (user-day biases: n_ud its ratings)
// i.e. SGD on the job's objective (mfscale/model.py), each rating's share of it at a time, halved. A row costs one
// read-modify-write per rating and no optimizer state, where the exact mini-batch step above groups the batch by
// row first (issue 22: 3-4x the op's ratings/s, 2.5x the job's on ml-10m). The threads split the batch and update
// the shared rows without locks (Hogwild, Niu et al. 2011; cornac's MF does the same): two threads rarely hold the
// same row at once in a batch of random ratings, and when they do an update can be lost. So only a run on one thread
// repeats bit for bit.
// W > 0: the row width as a compile-time constant (with_width), as step_impl's: 1.215x this op on ml-10m (RESULTS,
// session 17).
template <typename T, int64_t W = 0>
std::vector<double> sgd_impl(T* P, T* Q, int64_t w_rt, const int32_t* user, const int32_t* item, const T* rating,
                             int64_t n, T mu, T lr, T reg_f, T reg_b, bool biases, const Days<T>& days,
                             T reg_day) {
  constexpr int64_t kSgdAhead = 8;  // ratings ahead: each needs two random rows (and a day row)
  constexpr int64_t kChunk = 2048;  // ratings a thread takes at a time
  const int64_t w = W ? W : w_rt;
  const int64_t d = w - 1;
  const int nt = at::get_num_threads();
  std::vector<double> e_sum(nt, 0.0), e_sq(nt, 0.0);
  // One task per thread, each taking the next chunk of the batch until none is left: a thread that the OS
  // preempts (the shard hashing, TensorBoard's writer: 2 cores here) leaves its share to the others instead of
  // holding up the whole step, as a static split would. On one thread the chunks run in batch order.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    double es = 0, ss = 0;
    for (int64_t lo = next.fetch_add(kChunk); lo < n; lo = next.fetch_add(kChunk)) {
      const int64_t hi = std::min(lo + kChunk, n);
      for (int64_t k = lo; k < hi; ++k) {
        if (k + kSgdAhead < hi) {
          prefetch_row(P + user[k + kSgdAhead] * w, w, 1);
          prefetch_row(Q + item[k + kSgdAhead] * w, w, 1);
          if (days.table) __builtin_prefetch(days.table + int64_t{days.rows[k + kSgdAhead]} * 4, 1, 3);
        }
        T* pu = P + user[k] * w;
        T* qi = Q + item[k] * w;
        T* day = nullptr;
        if (days.table && days.rows[k] != days.missing) day = days.table + int64_t{days.rows[k]} * 4;
        const T bd = day ? day[0] : T(0);
        const T e = mu + dot(pu, qi, d) + (biases ? pu[d] + qi[d] : T(0)) + bd - rating[k];
        es += e;
        ss += static_cast<double>(e) * e;
        // simd: pu and qi are rows of two tables (never the same memory), which the compiler cannot know
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
          const T pc = pu[c], qc = qi[c];
          pu[c] = pc - lr * (e * qc + reg_f * pc);
          qi[c] = qc - lr * (e * pc + reg_f * qc);
        }
        if (biases) {
          pu[d] -= lr * (e + reg_b * pu[d]);
          qi[d] -= lr * (e + reg_b * qi[d]);
        }
        if (day) day[0] = bd - lr * (e + reg_day * day[2] * bd);
      }
    }
    const int t = at::get_thread_num();
    e_sum[t] += es;
    e_sq[t] += ss;
  });
  double es = 0, ss = 0;
  for (int t = 0; t < nt; ++t) {
    es += e_sum[t];
    ss += e_sq[t];
  }
  return {es, ss};
}

// Returns [sum of errors (prediction - rating, before each rating's update), sum of squared errors], float64.
at::Tensor sgd_step(at::Tensor users, at::Tensor items, at::Tensor user, at::Tensor item, at::Tensor rating,
                    double global_bias, double lr, double reg_f, double reg_b, bool biases, at::Tensor day_table,
                    at::Tensor day_rows, double reg_day) {
  const auto dtype = users.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "sgd_step: tables must be float32 or float64");
  for (const at::Tensor* t : {&users, &items, &rating})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == dtype,
                "sgd_step: tables and ratings must be contiguous CPU tensors of one dtype");
  const int64_t w = users.size(1);
  TORCH_CHECK(users.dim() == 2 && items.dim() == 2 && items.size(1) == w && w >= 2,
              "sgd_step: tables must be 2-D with equal widths (factors and a bias column)");
  TORCH_CHECK(user.numel() == item.numel() && rating.numel() == user.numel(),
              "sgd_step: user, item and rating must have equal lengths");
  const int64_t n = user.numel();
  const std::vector<at::Tensor> ids =
      op_ids(user, users.size(0), item, items.size(0), day_table, day_rows, dtype, "sgd_step");
  std::vector<double> out;
  AT_DISPATCH_FLOATING_TYPES(dtype, "sgd_step", [&] {
    const Days<scalar_t> days = days_of<scalar_t>(day_table, ids.size() > 2 ? ids[2] : day_rows);
    out = with_width(w, [&](auto width) {
      return sgd_impl<scalar_t, decltype(width)::value>(
          users.data_ptr<scalar_t>(), items.data_ptr<scalar_t>(), w, ids[0].data_ptr<int32_t>(),
          ids[1].data_ptr<int32_t>(), rating.data_ptr<scalar_t>(), n, static_cast<scalar_t>(global_bias),
          static_cast<scalar_t>(lr), static_cast<scalar_t>(reg_f), static_cast<scalar_t>(reg_b), biases, days,
          static_cast<scalar_t>(reg_day));
    });
  });
  return at::tensor(out, at::TensorOptions().dtype(at::kDouble));
}

// The time-aware biases (mfscale/timebias.py): bins (movie rows, 4B) and users (user rows, 4), each bias a row
// [value, RMSprop state, 1 / training ratings, scratch (NaN at rest)] as the user-day biases' rows. Rating k reads the
// bin row item[k] B + time_bin[k] and, with the drift, its user's row times time_dev[k]. As torch ops (int64
// conversions, gathers, a unique and an index_add per term) they cost about a table step on ml-10m.
template <typename T>
struct TimeRows {
  T* bins;
  T* users;
  const int64_t* user;
  const int64_t* item;
  const int16_t* bin;
  const float* dev;
  int64_t n_bins;
  bool drift;
};

// rating - b_{i,bin} - alpha_u dev, per rating
template <typename T>
void time_target_impl(const TimeRows<T>& t, const T* rating, T* out, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      if (k + 16 < e) {  // random rows: a few misses in flight
        if (t.n_bins) prefetch_row(t.bins + (t.item[k + 16] * t.n_bins + t.bin[k + 16]) * 4, 1, 0);
        if (t.drift) prefetch_row(t.users + t.user[k + 16] * 4, 1, 0);
      }
      T x = rating[k];
      if (t.n_bins) x -= t.bins[(t.item[k] * t.n_bins + t.bin[k]) * 4];
      if (t.drift) x -= t.users[t.user[k] * 4] * static_cast<T>(t.dev[k]);
      out[k] = x;
    }
  });
}

// Both terms' step from the batch's errors, in batch order (one thread: the sums repeat bit for bit): every rating's
// share added, then each touched row stepped once (the user-day biases' arithmetic, day_step_impl).
template <typename T>
void time_step_impl(const TimeRows<T>& t, const T* err, int64_t n, T scale, T size, T l2_bins, T l2_drift, T b2,
                    T eps) {
  constexpr int64_t kTimeAhead = 16;  // random rows: more misses in flight (as day_step_impl's)
  auto bin_row = [&](int64_t k) { return t.bins + (t.item[k] * t.n_bins + t.bin[k]) * 4; };
  auto user_row = [&](int64_t k) { return t.users + t.user[k] * 4; };
  auto ahead = [&](int64_t k) {
    if (k + kTimeAhead >= n) return;
    if (t.n_bins) prefetch_row(bin_row(k + kTimeAhead), 4, 1);
    if (t.drift) prefetch_row(user_row(k + kTimeAhead), 4, 1);
  };
  for (int64_t k = 0; k < n; ++k) {
    ahead(k);
    const T a = err[k] * scale;
    if (t.n_bins) bias_add(bin_row(k), a, l2_bins);
    if (t.drift) bias_add(user_row(k), a * static_cast<T>(t.dev[k]), l2_drift);
  }
  for (int64_t k = 0; k < n; ++k) {
    ahead(k);
    if (t.n_bins) bias_update(bin_row(k), size, b2, eps);
    if (t.drift) bias_update(user_row(k), size, b2, eps);
  }
}

template <typename T>
TimeRows<T> time_rows(const at::Tensor& bins, const at::Tensor& users, const at::Tensor& user, const at::Tensor& item,
                      const at::Tensor& time_bin, const at::Tensor& time_dev, int64_t n_bins, bool drift,
                      const char* op) {
  const auto dtype = users.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": tables must be float32 or float64");
  TORCH_CHECK(bins.device().is_cpu() && bins.is_contiguous() && bins.scalar_type() == dtype && bins.dim() == 2 &&
                  bins.size(1) == 4 * n_bins && users.device().is_cpu() && users.is_contiguous() && users.dim() == 2 &&
                  users.size(1) == 4,
              op, ": bins must be contiguous (movie rows, 4 x bins), users (user rows, 4), CPU, one dtype");
  const int64_t n = user.numel();
  TORCH_CHECK(item.numel() == n && time_bin.numel() == n && time_dev.numel() == n && user.is_contiguous() &&
                  item.is_contiguous() && time_bin.is_contiguous() && time_dev.is_contiguous(),
              op, ": one contiguous user, movie, bin and drift term per rating");
  TORCH_CHECK(user.scalar_type() == at::kLong && item.scalar_type() == at::kLong &&
                  time_bin.scalar_type() == at::kShort && time_dev.scalar_type() == at::kFloat,
              op, ": user and movie int64, time_bin int16, time_dev float32");
  check_ids(user, users.size(0), "user", op);
  check_ids(item, bins.size(0), "item", op);
  if (n_bins) {
    const int16_t* b = time_bin.data_ptr<int16_t>();
    for (int64_t k = 0; k < n; ++k)
      TORCH_CHECK(b[k] >= 0 && b[k] < n_bins, op, ": time bin ", b[k], " out of range [0, ", n_bins, ")");
  }
  return {bins.data_ptr<T>(), users.data_ptr<T>(), user.data_ptr<int64_t>(), item.data_ptr<int64_t>(),
          time_bin.data_ptr<int16_t>(), time_dev.data_ptr<float>(), n_bins, drift};
}

at::Tensor time_target(at::Tensor bins, at::Tensor users, at::Tensor user, at::Tensor item, at::Tensor time_bin,
                       at::Tensor time_dev, at::Tensor rating, int64_t n_bins, bool drift) {
  at::Tensor out = at::empty({user.numel()}, users.options());
  TORCH_CHECK(rating.numel() == user.numel() && rating.is_contiguous() && rating.scalar_type() == users.scalar_type(),
              "time_target: one rating per rating, of the tables' dtype");
  AT_DISPATCH_FLOATING_TYPES(users.scalar_type(), "time_target", [&] {
    const auto t = time_rows<scalar_t>(bins, users, user, item, time_bin, time_dev, n_bins, drift, "time_target");
    time_target_impl<scalar_t>(t, rating.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), user.numel());
  });
  return out;
}

void time_step(at::Tensor bins, at::Tensor users, at::Tensor user, at::Tensor item, at::Tensor time_bin,
               at::Tensor time_dev, at::Tensor err, int64_t n_bins, bool drift, double scale, double step_size,
               double l2_bins, double l2_drift, double beta2, double eps) {
  TORCH_CHECK(err.numel() == user.numel() && err.is_contiguous() && err.scalar_type() == users.scalar_type(),
              "time_step: one error per rating, of the tables' dtype");
  AT_DISPATCH_FLOATING_TYPES(users.scalar_type(), "time_step", [&] {
    const auto t = time_rows<scalar_t>(bins, users, user, item, time_bin, time_dev, n_bins, drift, "time_step");
    time_step_impl<scalar_t>(t, err.data_ptr<scalar_t>(), user.numel(), scale, step_size, l2_bins, l2_drift, beta2,
                             eps);
  });
}

}  // namespace

TORCH_LIBRARY(mfscale, m) {
  m.def(
      "fused_step(Tensor(a!) users, Tensor(b!) items, Tensor(c!) m_u, Tensor(d!) v_u, Tensor(e!) m_i, "
      "Tensor(f!) v_i, Tensor user, Tensor item, Tensor rating, float global_bias, float scale, Tensor col_w, "
      "float step_size_u, float step_size_i, float beta1, float beta2, float eps, Tensor(g!) mark_u, "
      "Tensor(h!) mark_i, Tensor(i!) work, float max_norm, bool biases, bool row_wise, "
      "Tensor(k!) day_table, Tensor day_rows, float day_step_size, float day_l2, Tensor(l!) errors, "
      "Tensor user_prior) -> Tensor");
  m.impl("fused_step", c10::DispatchKey::CPU, &fused_step);
  m.def(
      "sgd_step(Tensor(a!) users, Tensor(b!) items, Tensor user, Tensor item, Tensor rating, float global_bias, "
      "float lr, float reg_f, float reg_b, bool biases, Tensor(c!) day_table, Tensor day_rows, float reg_day) "
      "-> Tensor");
  m.impl("sgd_step", c10::DispatchKey::CPU, &sgd_step);
  m.def(
      "time_target(Tensor bins, Tensor users, Tensor user, Tensor item, Tensor time_bin, Tensor time_dev, "
      "Tensor rating, int n_bins, bool drift) -> Tensor");
  m.impl("time_target", c10::DispatchKey::CPU, &time_target);
  m.def(
      "time_step(Tensor(a!) bins, Tensor(b!) users, Tensor user, Tensor item, Tensor time_bin, Tensor time_dev, "
      "Tensor err, int n_bins, bool drift, float scale, float step_size, float l2_bins, float l2_drift, float beta2, "
      "float eps) -> ()");
  m.impl("time_step", c10::DispatchKey::CPU, &time_step);
}
