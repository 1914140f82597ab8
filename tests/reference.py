"""Independent numpy references for the maths (no keras_fsp code)."""

import numpy as np


def pool(x, size, mode="max"):
    b, h, w, c = x.shape
    rh, rw = h // size[0], w // size[1]
    x = x.reshape(b, size[0], rh, size[1], rw, c)
    return x.max(axis=(2, 4)) if mode == "max" else x.mean(axis=(2, 4))


def pool_steps(x, length, mode="avg"):
    """Sequences `(batch, steps, c)` pooled to `length` steps, group by group."""
    x = np.asarray(x, np.float64)
    r = x.shape[1] // length
    reduce = np.max if mode == "max" else np.mean
    return np.stack([reduce(x[:, k * r:(k + 1) * r], axis=1) for k in range(length)], axis=1)


def mask_steps(mask, steps):
    """A token mask `(batch, L)` at `steps` positions: a group of
    consecutive tokens is valid if any of them is."""
    mask = np.asarray(mask, bool)
    r = mask.shape[1] // steps
    return np.stack([mask[:, k * r:(k + 1) * r].any(axis=1) for k in range(steps)], axis=1)


def masked_pool_steps(x, mask, length, mode="avg"):
    """Sequences `(batch, steps, c)` pooled to `length` steps over their
    valid steps only (`mask` `(batch, L)`, brought to the steps first), and
    the pooled mask; a group without a valid step is 0."""
    x = np.asarray(x, np.float64)
    valid = mask_steps(mask, x.shape[1])
    r = x.shape[1] // length
    out = np.zeros((len(x), length, x.shape[2]))
    for b in range(len(x)):
        for k in range(length):
            rows = [x[b, j] for j in range(k * r, (k + 1) * r) if valid[b, j]]
            if rows:
                out[b, k] = np.max(rows, axis=0) if mode == "max" else np.mean(rows, axis=0)
    return out, mask_steps(mask, length)


def masked_fsp(f1, f2, mask, mode="max"):
    """The FSP matrix of sequences over their valid positions: the sum of
    the products at valid positions over their number."""
    length = min(np.shape(f1)[1], np.shape(f2)[1])
    (p1, valid), (p2, _) = (masked_pool_steps(f, mask, length, mode) for f in (f1, f2))
    out = np.zeros((len(p1), p1.shape[2], p2.shape[2]))
    for b in range(len(p1)):
        for p in range(length):
            if valid[b, p]:
                out[b] += np.outer(p1[b, p], p2[b, p])
        out[b] /= max(valid[b].sum(), 1)
    return out


def masked_hint_loss(hint, guided, mask, normalize=False):
    """Both sequences pooled to the shorter's length over valid steps;
    1/2 the squared difference summed (mean: averaged) over the valid
    positions, then over the batch."""
    length = min(np.shape(hint)[1], np.shape(guided)[1])
    (h, valid), (g, _) = (masked_pool_steps(f, mask, length) for f in (hint, guided))
    per = np.array([0.5 * ((h[b] - g[b])[valid[b]] ** 2).sum() for b in range(len(h))])
    if normalize:
        per = per / np.maximum(valid.sum(1), 1) / h.shape[2]
    return per.mean()


def masked_attention_transfer_loss(t_maps, s_maps, mask, beta=1000.0, p=2):
    """Mean-squared attention transfer over the valid positions: energies
    of padded positions 0, groups averaging their valid steps."""
    total = 0.0
    for t, s in zip(t_maps, s_maps):
        length = min(np.shape(t)[1], np.shape(s)[1])
        maps = []
        for f in (s, t):
            q = (np.abs(np.asarray(f, np.float64)) ** p).sum(axis=-1, keepdims=True)
            q, valid = masked_pool_steps(q, mask, length)
            q = q[..., 0]
            maps.append(q / np.linalg.norm(q, axis=1, keepdims=True))
        total = total + ((maps[0] - maps[1]) ** 2).sum(axis=1) / np.maximum(valid.sum(1), 1)
    return (beta / 2 * total).mean()


def fsp(f1, f2, mode="max"):
    """Maps `(b, h, w, c)` or sequences `(b, steps, c)`."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim == 3:
        length = min(f1.shape[1], f2.shape[1])
        f1, f2 = pool_steps(f1, length, mode), pool_steps(f2, length, mode)
        return np.einsum("bpm,bpn->bmn", f1, f2) / length
    size = min(f1.shape[1:3], f2.shape[1:3])
    f1, f2 = pool(f1, size, mode), pool(f2, size, mode)
    b, h, w, m = f1.shape
    out = np.zeros((b, m, f2.shape[-1]))
    for i in range(m):
        for j in range(f2.shape[-1]):
            out[:, i, j] = (f1[..., i] * f2[..., j]).sum(axis=(1, 2)) / (h * w)
    return out


def fsp_loss(g_t, g_s, weights=None):
    weights = weights or [1.0] * len(g_t)
    per_example = sum(
        w * ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).sum(axis=(1, 2))
        for w, a, b in zip(weights, g_t, g_s)
    )
    return per_example.mean()


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def soft_target_loss(teacher_logits, student_logits, t):
    p = softmax(np.asarray(teacher_logits) / t)
    q = softmax(np.asarray(student_logits) / t)
    return (t * t * kl(p, q)).mean()


def cross_entropy_per_example(labels, logits):
    q = softmax(logits)
    return -np.log(q[np.arange(len(labels)), labels])


def cross_entropy(labels, logits):
    return cross_entropy_per_example(labels, logits).mean()


def hint_loss(hint, regressed):
    d = np.asarray(hint, np.float64) - np.asarray(regressed, np.float64)
    return 0.5 * (d ** 2).reshape(len(d), -1).sum(axis=1).mean()


def attention_map(f, p=2, length=None):
    """`length`: sequences' energies averaged over groups of steps first."""
    f = np.asarray(f, np.float64)
    q = (np.abs(f) ** p).sum(axis=-1).reshape(len(f), -1)
    if length is not None:
        q = q.reshape(len(f), length, -1).mean(axis=2)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def attention_transfer_loss(t_maps, s_maps, beta=1000.0, p=2, reduction="mean_squared"):
    """beta/2 * sum over pairs of d(Q_S, Q_T), batch mean; sequences of
    different lengths meet at the shorter."""
    total = 0.0
    for t, s in zip(t_maps, s_maps):
        length = None if np.ndim(t) == 4 else min(np.shape(t)[1], np.shape(s)[1])
        d = attention_map(s, p, length) - attention_map(t, p, length)
        total = total + ((d ** 2).mean(axis=1) if reduction == "mean_squared"
                         else np.sqrt((d ** 2).sum(axis=1)))
    return (beta / 2 * total).mean()


def kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def decoupled_kd(teacher_logits, student_logits, labels, alpha=1.0, beta=8.0, t=4.0):
    """Per example, from the definitions: binary [p_target, 1 - p_target]
    and the softmax over the non-target classes."""
    pt = softmax(np.asarray(teacher_logits, np.float64) / t)
    ps = softmax(np.asarray(student_logits, np.float64) / t)
    rows = np.arange(len(labels))
    bt = np.stack([pt[rows, labels], 1 - pt[rows, labels]], axis=1)
    bs = np.stack([ps[rows, labels], 1 - ps[rows, labels]], axis=1)
    keep = np.ones_like(pt, bool)
    keep[rows, labels] = False
    qt = pt[keep].reshape(len(pt), -1)
    qt = qt / qt.sum(axis=1, keepdims=True)
    qs = ps[keep].reshape(len(ps), -1)
    qs = qs / qs.sum(axis=1, keepdims=True)
    return (alpha * kl(bt, bs) + beta * kl(qt, qs)) * t * t


def batch_norm_per_group(x, gamma, beta, groups, epsilon=1e-3):
    """Training-mode batch norm of `x` (channels last), each of `groups`
    consecutive parts of the batch with its own (biased) statistics; returns
    the outputs and the groups' mean statistics."""
    x = np.asarray(x, np.float64)
    parts = x.reshape((groups, -1) + x.shape[1:])
    axes = tuple(range(1, parts.ndim - 1))
    mean = parts.mean(axis=axes, keepdims=True)
    var = parts.var(axis=axes, keepdims=True)
    out = (parts - mean) / np.sqrt(var + epsilon) * gamma + beta
    channels = x.shape[-1]
    return (out.reshape(x.shape), mean.reshape(groups, channels).mean(0),
            var.reshape(groups, channels).mean(0))


def standardize(z):
    z = np.asarray(z, np.float64)
    return (z - z.mean(-1, keepdims=True)) / (1e-7 + z.std(-1, ddof=1, keepdims=True))


def standardized_kd(teacher_logits, student_logits, t=2.0):
    """Per example (Sun et al. 2024: KD on z-scored logits)."""
    return t * t * kl(softmax(standardize(teacher_logits) / t), softmax(standardize(student_logits) / t))


def _pearson_distance_rows(a, b):
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return 1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8)


def dist_loss(teacher_logits, student_logits, t=4.0, beta=2.0, gamma=2.0):
    """One value for the batch (Huang et al. 2022)."""
    p_t = softmax(np.asarray(teacher_logits, np.float64) / t)
    p_s = softmax(np.asarray(student_logits, np.float64) / t)
    inter = _pearson_distance_rows(p_s, p_t).mean()
    intra = _pearson_distance_rows(p_s.T, p_t.T).mean()
    return t * t * (beta * inter + gamma * intra)


def _huber_mean(a, b):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()


def _flat(f):
    f = np.asarray(f, np.float64)
    return f.reshape(len(f), -1)


def rkd_loss(teacher, student, distance_weight=25.0, angle_weight=50.0):
    """Park et al. 2019, from the definitions: distances of the pairs i != j
    (by differences, not a Gram matrix) over their mean, and the cosine at
    every i of the triplets (j, i, k), 0 where a side has length 0 (j or k
    is i, or a duplicate of it)."""
    def distances(e):
        d = np.sqrt(((e[:, None, :] - e[None, :, :]) ** 2).sum(-1))
        off = ~np.eye(len(e), dtype=bool)
        return d / d[off].mean()

    def angles(e):
        b = len(e)
        out = np.zeros((b, b, b))
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    u, v = e[j] - e[i], e[k] - e[i]
                    if np.linalg.norm(u) > 0 and np.linalg.norm(v) > 0:
                        out[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return out

    t, s = _flat(teacher), _flat(student)
    return (distance_weight * _huber_mean(distances(s), distances(t))
            + angle_weight * _huber_mean(angles(s), angles(t)))


def pkt_loss(teacher, student, eps=1e-7):
    """Passalis & Tefas 2018: KL of cosine-kernel conditional probabilities,
    the mean over all pairs (the authors' code)."""
    def probabilities(f):
        b = len(f)
        k = np.array([[(1 + f[i] @ f[j] / ((np.linalg.norm(f[i]) + eps) * (np.linalg.norm(f[j]) + eps))) / 2
                       for j in range(b)] for i in range(b)])
        return k / k.sum(1, keepdims=True)

    p_t, p_s = probabilities(_flat(teacher)), probabilities(_flat(student))
    return (p_t * np.log((p_t + eps) / (p_s + eps))).mean()


def similarity_preserving_loss(teacher, student):
    """Tung & Mori 2019: squared Frobenius distance of the row-normalised
    batch Gram matrices, over batch^2."""
    def gram(f):
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    t, s = _flat(teacher), _flat(student)
    return ((gram(t) - gram(s)) ** 2).sum() / len(t) ** 2


def crd_embedding(features, kernel, bias):
    """CRD's embedding: a linear map of the flattened features, L2-normalised."""
    e = _flat(features) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def crd_loss(teacher, student, teacher_queue, student_queue, temperature=0.07):
    """Tian et al. 2020 in the softmax (InfoNCE) form, per example: `-log`
    of the probability of the other network's embedding of the same example
    among it and the other network's queue, student as anchor plus teacher
    as anchor. The queues hold only their filled slots."""
    def info_nce(anchors, positives, negatives):
        out = []
        for a, p in zip(anchors, positives):
            logits = np.concatenate([[a @ p], np.asarray(negatives, np.float64) @ a]) / temperature
            out.append(-np.log(np.exp(logits[0]) / np.exp(logits).sum()))
        return np.array(out)

    t, s = _flat(teacher), _flat(student)
    return info_nce(s, t, teacher_queue) + info_nce(t, s, student_queue)


def adaptive_average_pool(x, size):
    """PyTorch's `adaptive_avg_pool2d` of `(batch, h, w, c)` to `size x
    size`: output cell `(i, j)` averages rows `floor(i h / size)` to
    `ceil((i + 1) h / size)` (exclusive), columns likewise."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    out = np.zeros((b, size, size, c))
    for i in range(size):
        r0, r1 = int(np.floor(i * h / size)), int(np.ceil((i + 1) * h / size))
        for j in range(size):
            c0, c1 = int(np.floor(j * w / size)), int(np.ceil((j + 1) * w / size))
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def hcl_loss(student, teacher):
    """ReviewKD's hierarchical context loss (the authors' `hcl`), per
    example: per level, the MSE plus the MSEs after adaptive average pooling
    to 4, 2, 1 (those below the height) weighted 1/2, 1/4, ... in turn,
    over the weights' sum; summed over the levels."""
    total = 0.0
    for fs, ft in zip(student, teacher):
        fs, ft = np.asarray(fs, np.float64), np.asarray(ft, np.float64)
        loss = ((fs - ft) ** 2).mean(axis=(1, 2, 3))
        cnt = tot = 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[1]:
                continue
            cnt /= 2.0
            diff = adaptive_average_pool(fs, size) - adaptive_average_pool(ft, size)
            loss = loss + (diff ** 2).mean(axis=(1, 2, 3)) * cnt
            tot += cnt
        total = total + loss / tot
    return total


def nearest_upsample(x, size):
    """PyTorch's `interpolate(mode="nearest")` of `(batch, h, w, c)` to
    `size`: output row `i` is input row `floor(i * h / size[0])`."""
    h, w = x.shape[1:3]
    rows = [int(np.floor(i * h / size[0])) for i in range(size[0])]
    cols = [int(np.floor(j * w / size[1])) for j in range(size[1])]
    return np.asarray(x)[:, rows][:, :, cols]


def conv2d_same(x, kernel, bias=None):
    """Stride-1 convolution of `(batch, h, w, c)` by `(k, k, c, out)`, zero
    padding `k // 2` (PyTorch's `padding=1` for 3x3)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    k, p = kernel.shape[0], kernel.shape[0] // 2
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for di in range(k):
        for dj in range(k):
            out += padded[:, di:di + h, dj:dj + w] @ kernel[di, dj]
    return out if bias is None else out + np.asarray(bias, np.float64)


def batch_norm_train(x, gamma, beta, epsilon=1e-5):
    """Batch norm in training mode: each channel normalised by the batch's
    mean and (biased) variance over examples and positions."""
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + epsilon) * np.asarray(gamma) + np.asarray(beta)


def abf(x, residual, weights, out_size):
    """One ReviewKD ABF module's forward pass in training mode (the
    authors' `ABF.forward`): `weights` holds `conv1` (kernel), `bn1`
    (gamma, beta), `attention` (kernel, bias; absent at the deepest level),
    `conv2` (kernel), `bn2` (gamma, beta). Returns `(output, fusion)`."""
    x = batch_norm_train(conv2d_same(x, weights["conv1"][0]), *weights["bn1"])
    if residual is not None:
        residual = nearest_upsample(residual, x.shape[1:3])
        z = conv2d_same(np.concatenate([x, residual], axis=-1), *weights["attention"])
        z = 1.0 / (1.0 + np.exp(-z))
        x = x * z[..., :1] + residual * z[..., 1:]
    if tuple(x.shape[1:3]) != tuple(out_size):
        x = nearest_upsample(x, out_size)
    return batch_norm_train(conv2d_same(x, weights["conv2"][0]), *weights["bn2"]), x
