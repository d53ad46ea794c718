// Series math for the charts: append-only metric columns, EMA smoothing, display downsampling.
// Pure functions and small classes, no DOM: every point is kept; only what is drawn is thinned.

/** One metric of one run: parallel columns of step, wall time (s) and value. */
export class Series {
  constructor() {
    this.step = [];
    this.ts = [];
    this.val = [];
    // True once a step arrived that is not after the previous one (a run revisited by switch_run).
    this.rewound = false;
  }

  get length() {
    return this.val.length;
  }

  push(step, ts, value) {
    const n = this.step.length;
    if (n > 0 && step <= this.step[n - 1]) this.rewound = true;
    this.step.push(step);
    this.ts.push(ts);
    this.val.push(value);
  }

  last() {
    const n = this.val.length;
    return n ? { step: this.step[n - 1], ts: this.ts[n - 1], val: this.val[n - 1] } : null;
  }

  /** The last point at or before `x` on axis `key` ('step' or 'ts'), with its index, or null. */
  pointAtOrBefore(key, x) {
    const xs = this[key];
    let found = -1;
    if (key === "ts" || !this.rewound) {
      found = upperBound(xs, x) - 1; // ascending: binary search
    } else {
      for (let i = xs.length - 1; i >= 0; i--) {
        if (xs[i] <= x) {
          found = i;
          break;
        }
      }
    }
    return found < 0 ? null : { index: found, step: this.step[found], ts: this.ts[found], val: this.val[found] };
  }
}

/**
 * Debiased exponential moving average of `values` (TensorBoard's smoothing), extended in place.
 * `cache` holds {alpha, out, acc, n}; a different alpha recomputes from the start.
 */
export function emaInto(cache, values, alpha) {
  if (cache.alpha !== alpha || cache.out.length > values.length) {
    cache.alpha = alpha;
    cache.out = [];
    cache.acc = 0;
    cache.n = 0;
  }
  const out = cache.out;
  for (let i = out.length; i < values.length; i++) {
    const v = values[i];
    if (v === null || !Number.isFinite(v)) {
      out.push(null);
      continue;
    }
    cache.acc = alpha * cache.acc + (1 - alpha) * v;
    cache.n += 1;
    const debias = alpha > 0 ? 1 - Math.pow(alpha, cache.n) : 1;
    out.push(cache.acc / debias);
  }
  return out;
}

/** Index of the first element of ascending `xs` that is >= x. */
export function lowerBound(xs, x) {
  let lo = 0;
  let hi = xs.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (xs[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Index of the first element of ascending `xs` that is > x. */
export function upperBound(xs, x) {
  let lo = 0;
  let hi = xs.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (xs[mid] <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * Columns sorted by x with one value per x (the latest wins), for a series whose x went back.
 * Returns [xs, ys] as new arrays.
 */
export function latestPerX(xs, ys) {
  const byX = new Map();
  for (let i = 0; i < xs.length; i++) byX.set(xs[i], ys[i]);
  const keys = Array.from(byX.keys()).sort((a, b) => a - b);
  return [keys, keys.map((k) => byX.get(k))];
}

/**
 * Indices of ascending `xs` to draw: at most ~2*buckets inside [xmin, xmax] (null: no bound),
 * each bucket's lowest and highest `ys` in x order, so spikes stay visible. One point either
 * side of the window is kept so lines run to the chart's edges.
 */
export function thinIndices(xs, ys, buckets, xmin = null, xmax = null) {
  const i0 = xmin === null ? 0 : Math.max(0, lowerBound(xs, xmin) - 1);
  const i1 = xmax === null ? xs.length : Math.min(xs.length, lowerBound(xs, xmax) + 1);
  const out = [];
  if (i1 - i0 <= 2 * buckets) {
    for (let i = i0; i < i1; i++) out.push(i);
    return out;
  }
  const x0 = xs[i0];
  const span = xs[i1 - 1] - x0 || 1;
  let b = -1;
  let lo = -1;
  let hi = -1;
  const flush = () => {
    if (lo < 0) return;
    out.push(Math.min(lo, hi));
    if (hi !== lo) out.push(Math.max(lo, hi));
  };
  for (let i = i0; i < i1; i++) {
    const bucket = Math.min(buckets - 1, Math.floor(((xs[i] - x0) / span) * buckets));
    if (bucket !== b) {
      flush();
      b = bucket;
      lo = hi = -1;
    }
    const y = ys[i];
    if (y === null || !Number.isFinite(y)) continue;
    if (lo < 0 || y < ys[lo]) lo = i;
    if (hi < 0 || y > ys[hi]) hi = i;
  }
  flush();
  return out;
}

/** `thinIndices` applied: [xs, ys] of the points to draw. */
export function downsample(xs, ys, buckets, xmin = null, xmax = null) {
  const idx = thinIndices(xs, ys, buckets, xmin, xmax);
  return [idx.map((i) => xs[i]), idx.map((i) => ys[i])];
}

/** Equal-width histogram of the finite values: {edges, counts, min, max, n}. */
export function histogram(values, bins) {
  const finite = values.filter((v) => v !== null && Number.isFinite(v));
  if (!finite.length) return { edges: [], counts: [], min: null, max: null, n: 0 };
  let min = Infinity;
  let max = -Infinity;
  for (const v of finite) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  const width = max > min ? (max - min) / bins : 1;
  const counts = new Array(bins).fill(0);
  for (const v of finite) counts[Math.min(bins - 1, Math.floor((v - min) / width))] += 1;
  const edges = Array.from({ length: bins + 1 }, (_, i) => min + i * width);
  return { edges, counts, min, max, n: finite.length };
}

/** How many finite values lie in [lo, hi] (the same rule as the trainer's region selection). */
export function countInRange(values, lo, hi) {
  let n = 0;
  for (const v of values) if (v !== null && v >= lo && v <= hi) n += 1;
  return n;
}
