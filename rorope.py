"""
The calibrated init, beyond Algorithm 1 (svd_init.upcycle(init="rorope")): a shared RoPE key that keeps rotating, factorisations that see the
activations and weigh each error by what it costs, ranks chosen under a cache budget.

Everything here needs only C = E[x xᵀ] (and E[x]) of each layer's attention input x: queries, keys and values
are linear in x, so their second moments are Wᵀ C W. In the paper's orientation (W: in x out), per layer:
  RoRoPE  For source frequency i, pair (i, i + d_h/2) of every KV head j rotates by the same angle. An orthogonal
          mix u across heads, applied alike to both dims of the pair, commutes with that rotation, so the
          shared key k_r = Σ_j u_j s_j k_j still rotates exactly, and q_h·k_j = a_j q_h·k_r + q_h·(k_j - a_j k_r)
          with a_j = u_j / s_j, exactly. s_j = √(query energy of group j at i) (rescaling keys by s and queries by
          1/s changes nothing); u = the top eigenvector of the s-weighted key second moment (PCA), so k_r carries
          most of what the queries read. The rest, k_j - a_j k_r, joins the no-RoPE part (d_qk = d_h), where it
          is scored without rotation: the one approximation. d_r < d_h keeps d_r/2 frequencies, the ones that a
          standard d_r-dim rotary computes as is (see rope_pairs), so a serving engine needs nothing special.
  Folding  (rope_fold f > 1, after TransMLA's freqfold) The same PCA, jointly over f adjacent frequencies of all KV
          heads (n_kv f components per group); the top f/c of them (c = d_h / d_r) rotate at the group's kept
          frequencies (every c-th: a standard rotary at the source's theta). A component that mixes frequencies
          rotates at one of them, a second approximation, but far more of the keys' energy rotates. The group's PCA is
          plain (a query-weighted one measured worse: docs/init.md). The calibration KL picks f beside d_r.
  Factorisation  [K_res | V] (d, 2 n_kv d_h) ≈ W_DKV B with the cost E||x (W - W_DKV B) G||², x the calibration
          activations (whitening, C) and G per column block: key errors through the queries that read them
          (E[q qᵀ] of the group, times the spread of the values they mix), value errors through W_O
          (W_O,h W_O,hᵀ).
          Optimum: the SVD of C^½ W G; W_DKV = W G V_r / S_r (= C^-½ U_r, without inverting C) and B by
          C-weighted least squares (B = W_DKVᵀ C W). W_Q alike with G = I.
  Budget  the same weighted singular values say what each unit of rank buys in each layer: water-filling.
  Refit   (refit_values; the one step that needs more than C) the chosen student's W_UV and W_O refitted by least
          squares to the teacher's attention outputs, layer by layer on the calibration tokens: the factorisations
          fit weights, this fits what each layer outputs after its approximate attention.

The calibration statistics, the latent-norm fitting and the rank allocator are here too. svd_init.py assembles the
student from these pieces; nothing here imports svd_init, so the two read apart.
"""
import contextlib

import torch
import torch.nn.functional as F

from errors import BadInput
from model import ModelConfig, RMSNorm, Transformer
from ops import token_kl


@torch.no_grad()
def layer_inputs(model: Transformer, ids, layers, each, batch_size=4, last=None):
    """One forward over token ids (N, T), batch_size sequences at a time: each(i, b, x) for every layer i in
    `layers`, x (B, T, d) the attention input of batch b (the input_layernorm output); last(b, h) with the final
    normed hidden states h (B, T, d) of batch b."""
    dev = model.lm_head.weight.device

    def hook(i):
        return lambda _mod, args: each(i, b, args[0])

    handles = [model.model.layers[i].self_attn.register_forward_pre_hook(hook(i)) for i in layers]
    try:
        for b, start in enumerate(range(0, len(ids), batch_size)):
            h = model.forward_hidden(ids[start:start + batch_size].to(dev))
            if last is not None:
                last(b, h)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate(model: Transformer, ids, layers, batch_size=4, inputs=None, first_hidden=None):
    """E[x xᵀ] (d, d) and E[x] (d,) in float64 of the attention input x (the input_layernorm output) of each layer
    in `layers`, over calibration token ids (N, T). Returns ({layer: (C, mean)}, number of tokens). inputs: a dict
    to fill with each layer's inputs, {layer: [x (B, T, d) of each batch]}, for refit_values (N T d numbers a layer,
    in the model's dtype), so the refit never runs the teacher again. first_hidden: a list to which the first
    batch's final hidden states (B, T, d) are appended (head_logits: the teacher's side of the candidates' scores,
    without another teacher forward)."""
    if not torch.is_tensor(ids) or ids.dtype != torch.long or ids.dim() != 2 or ids.numel() == 0:
        raise BadInput("calib must be a non-empty LongTensor (N, T) of token ids (svd_init.py and distill.py take "
                       "it from their data: calib_data / sft_data, calib_tokens)")
    if int(ids.max()) >= model.config.vocab_size or int(ids.min()) < 0:
        raise BadInput(f"calib has token ids outside [0, {model.config.vocab_size}): not this model's tokenizer")
    d, dev = model.config.dim, model.lm_head.weight.device
    stats = {i: [torch.zeros(d, d, dtype=torch.float64, device=dev), torch.zeros(d, dtype=torch.float64, device=dev)]
             for i in layers}

    def each(i, _b, x):
        if inputs is not None:
            inputs.setdefault(i, []).append(x)
        x = x.flatten(0, 1).double()                                             # (B T, d)
        stats[i][0].addmm_(x.T, x)
        stats[i][1].add_(x.sum(0))

    keep_first = None if first_hidden is None else (lambda b, h: first_hidden.append(h) if b == 0 else None)
    layer_inputs(model, ids, layers, each, batch_size, keep_first)
    n = ids.numel()
    return {i: (C / n, m / n) for i, (C, m) in stats.items()}, n


NORM_INITS = ("calibrated", "diagonal", "gain", "scalar", "ones")


@torch.no_grad()
def calibrate_latent_norms(model: Transformer, ids, layers, how="calibrated", batch_size=4):
    """Set the latent RMSNorms of MLA `layers` (in place) so the model computes, as nearly as it can with them, what it
    computed without. RMSNorm(c) = g * c / sqrt(ms(c) + eps) divides each token's latent by that token's own RMS, which
    no weight undoes; the fit below first makes that RMS as steady across tokens as it can, then fits g to the rest.
    All statistics are of the no-norm model (the norms bypassed while measuring) on the calibration ids, all layers
    at once:
      1. A basis of the latent in which every token's RMS is about the same: c -> T c, with W_DKV's rows mixed by T
         and W_UK's, W_UV's columns by T^-1 (the same model, exactly). how="calibrated": T (r x r) minimises
         Var(|T c|^2) / E[|T c|^2]^2 over the calibration tokens (steady_basis: Adam, condition number <= 10 so no
         direction is lost). how="diagonal": only steady_basis's closed-form diagonal start. Directions whose
         magnitude swings from token to token (outlier tokens) then count less in the RMS.
      2. W_DKV times s so the latent's mean square is about 1 (s from the first batch): eps then matters as little
         as it can, for 1e-6 here and rms_norm_eps in the serving engines, and the cached latent is O(1).
      3. With u = s c / sqrt(ms(s c) + eps): g_j = E[u_j c_j] / E[u_j^2], the least-squares fit of g * u to c.
    how="gain" skips step 1; "scalar" also fits one g for all dimensions; "ones" leaves g = 1 and the weights as
    they are (what a norm starts as otherwise: it changes the latent's scale). latent_norm "both" does the same for
    c_q (W_DQ; W_UQ and W_QR read it)."""
    if how not in NORM_INITS:
        raise BadInput(f"latent_norm_init={how!r}: use one of {', '.join(map(repr, NORM_INITS))}")
    cfg = model.config
    if cfg.latent_norm == "none" or how == "ones":
        return
    if ids is None:
        raise BadInput("latent norms are initialised from calibration data: pass calib (token ids (N, T)), or "
                       "latent_norm_init='ones'")
    pairs = {}  # (layer, "kv" | "q") -> (down projection, its norm, the up projections reading the latent)
    for i in layers:
        a = model.model.layers[i].self_attn
        pairs[i, "kv"] = (a.W_DKV, a.kv_norm, (a.W_UK, a.W_UV))
        if cfg.latent_norm == "both":
            pairs[i, "q"] = (a.W_DQ, a.q_norm, (a.W_UQ, a.W_QR))
    if how in ("calibrated", "diagonal"):
        samples = _latent_pass(model, ids, pairs, batch_size, lambda c, acc: acc + [c.float()], [])
        for key, (down, _, ups) in pairs.items():
            Tk = steady_basis(torch.cat(samples.pop(key)), steps=100 if how == "calibrated" else 0)
            down.weight.copy_(Tk @ down.weight.double())
            for up in ups:
                up.weight.copy_(up.weight.double() @ torch.linalg.inv(Tk))

    def fit(c, acc):
        ms = c.pow(2).mean(-1, keepdim=True)                                       # (N, 1)
        s = acc[0] if acc[0] is not None else float(ms.mean().clamp_min(1e-30).rsqrt())
        u = s * c / (s * s * ms + acc[3]).sqrt()
        return s, acc[1] + (u * c).sum(0), acc[2] + (u * u).sum(0), acc[3]

    sums = _latent_pass(model, ids, pairs, batch_size, fit, lambda key: (None, 0.0, 0.0, pairs[key][1].eps))
    for key, (down, norm, _) in pairs.items():
        s, uc, uu, _ = sums[key]
        # a latent dimension that is always 0 (r_kv beyond the weighted matrix's rank: a zero row of W_DKV) has
        # uu = 0; its gain multiplies nothing, so 1 (0 / 0 would put a NaN into every later layer)
        g = torch.where(uu > 0, uc / torch.where(uu > 0, uu, 1.0), 1.0) if how != "scalar" else \
            (uc.sum() / uu.sum()).expand_as(uc)
        down.weight.mul_(s)
        norm.weight.copy_(g.to(norm.weight.dtype))


def steady_basis(c, steps=100, lr=0.01, max_cond=10.0, max_work=2 ** 31, min_scale=0.1):
    """T (r, r) float64 minimising Var(|T c|^2) / E[|T c|^2]^2 over the rows of c (N, r): the basis in which a token's
    RMS varies least. In standardised coordinates z (each dimension of c divided by its RMS, or by min_scale times
    the largest RMS where that is more: a direction the calibration barely excites is not scaled up to count as much
    as the others, whatever other tokens would then put into it): start from the closed-
    form diagonal solution (t_j^2 ∝ (Cov(z^2)^-1 E[z^2])_j), keep it if it is already steady (relative variance
    < 1e-4, e.g. a full-rank query latent, which is the RMS-normed x itself), else refine the full matrix by Adam
    on at most max_work / r^2 tokens (a step costs N r^2). T's singular values stay within max_cond of each other
    (without the bound the problem degenerates: a direction weighted ~0 no longer counts, and its tokens' latents
    blow up). Deterministic on CPU for given c."""
    r = c.shape[1]
    c = c.float()
    scale = c.pow(2).mean(0).sqrt()                                                 # (r,)
    scale = scale.clamp_min(scale.max() * min_scale).clamp_min(1e-12)   # a barely excited one: not blown up
    z = c / scale
    z2 = z.pow(2).double()
    m = z2.mean(0)
    cov = z2.T @ z2 / len(z2) - torch.outer(m, m)
    cov += 1e-9 * cov.diagonal().mean() * torch.eye(r, dtype=cov.dtype, device=cov.device)
    w = torch.linalg.solve(cov, m)
    if not (torch.isfinite(w).all() and w.max() > 0):
        w = torch.ones_like(m)
    w = w.clamp(w.max() / max_cond ** 2, None)                                     # t within max_cond
    T = torch.diag(w.sqrt()).float().requires_grad_(True)
    z = z[:max(256, max_work // (r * r))]

    def rel_var(T):
        q = (z @ T.T).pow(2).sum(-1)                                                # |T z|^2 per token, (N,)
        return q.var() / q.mean().pow(2)

    if rel_var(T).item() >= 1e-4:
        opt = torch.optim.Adam([T], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                loss = rel_var(T)
                if not torch.isfinite(loss):
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    U, S, Vh = torch.linalg.svd(T.double())
                    T.copy_(U @ torch.diag(S.clamp_min(S.max() / max_cond)) @ Vh)
    return T.detach().double() / scale.double()[None, :]


def _latent_pass(model, ids, pairs, batch_size, step, init):
    """One forward pass over ids with the latent norms of `pairs` bypassed; acc[key] = step(c (N, r) float64, acc)
    for each latent c = down(x). init: the first acc (or a function of the key giving it)."""
    acc = {key: init(key) if callable(init) else init for key in pairs}

    def hook(key):
        def f(_mod, _args, out):
            acc[key] = step(out.flatten(0, 1).double(), acc[key])
        return f

    handles = [down.register_forward_hook(hook(key)) for key, (down, _, _) in pairs.items()]
    dev = model.lm_head.weight.device
    try:
        with _bypassed(model, sorted({i for i, _ in pairs})):
            for b in range(0, len(ids), batch_size):
                model.forward_hidden(ids[b:b + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
    return acc


@contextlib.contextmanager
def _bypassed(model, layers):
    """The latent norms of MLA `layers` act as identities inside the block: the model computes its no-norm self."""
    norms = [n for i in layers for n in (model.model.layers[i].self_attn.q_norm, model.model.layers[i].self_attn.kv_norm)
             if isinstance(n, RMSNorm)]
    handles = [n.register_forward_hook(lambda _m, args, _out: args[0]) for n in norms]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def rope_pairs(d_h, d_r, ladder="highest"):
    """The source frequencies (pair i = dims i, i + d_h/2; frequency theta^(-2i/d_h)) that a standard d_r-dim rotary
    computes, in its order, and the exponent e of its theta' = theta^e:
        "highest": the d_r/2 highest frequencies, i = 0 .. d_r/2 - 1, at theta' = theta^(d_r/d_h)
        "every":   every c-th frequency, i = c k with c = d_h/d_r, at theta' = theta (the source's own)
    Llama 3's frequency scaling acts on each frequency alone, so it carries over to the subset unchanged."""
    k = d_r // 2
    if ladder == "highest":
        return list(range(k)), d_r / d_h
    c = (d_h // 2) // k
    return [c * j for j in range(k)], 1.0


FOLDS = (1, 2, 4, 8)


def fold_problem(d_h, d_r, fold):
    """Why `fold` adjacent source frequencies cannot be folded into a d_r-dim key, or "" where they can. A fold f > 1
    keeps f/c components of each group of f frequencies (c = d_h / d_r), so c must divide f and f must divide d_h/2."""
    half, k = d_h // 2, d_r // 2
    if fold == 1:
        return ""
    if fold not in FOLDS:
        return f"rope_fold={fold}: use one of {', '.join(map(str, FOLDS))} (or None: chosen under kv_budget)"
    if half % k or fold % (half // k) or half % fold:
        return (f"rope_fold={fold} with d_r {d_r} of d_h {d_h}: a fold keeps fold/c components of each group of fold "
                f"frequencies, c = d_h/d_r = {d_h / d_r:g}, so c must be a whole number dividing the fold, and the "
                f"fold must divide d_h/2 = {half}")
    return ""


def rope_groups(d_h, pairs, fold):
    """The RoRoPE key's groups: [(source frequencies, slots of the shared key)], each slot one pair of the d_r-dim
    rotary, rotating at frequency pairs[slot]. fold 1: each kept frequency alone (exact rotation). fold f > 1
    (pairs: every c-th frequency): f adjacent frequencies, their f/c kept ones the group's slots."""
    if fold == 1:
        return [([i], [slot]) for slot, i in enumerate(pairs)]
    m = fold * len(pairs) // (d_h // 2)  # slots per group: fold / c
    return [(list(range(g * fold, (g + 1) * fold)), list(range(g * m, (g + 1) * m)))
            for g in range(d_h // 2 // fold)]


def _sqrtm(M):
    """Square root of a symmetric PSD matrix (float64)."""
    e, V = torch.linalg.eigh(M)
    return (V * e.clamp_min(0).sqrt()) @ V.T


def _weighted_svd(W, C, G, whiten, gram=None):
    """SVD of the matrix whose rank-r truncation error is the cost: C^½ W G (E||x ΔW G||²) or, unwhitened, W G.
    Whitened, only S and V are needed (_truncate), and they come from the eigendecomposition of its Gram matrix
    (W G)ᵀ C (W G) (or `gram`, already computed): no C^½, and ~3x faster than the SVD at d = 2048; S is resolved to
    ~1e-8 of S[0] (float64's square root), finer than any direction a truncation keeps. -> (U or None, S, Vh)."""
    A = W if G is None else W @ G
    if not whiten:
        return torch.linalg.svd(A, full_matrices=False)
    k = min(A.shape)
    e, V = torch.linalg.eigh(A.T @ (C @ A) if gram is None else gram)  # ascending
    return None, e.flip(0)[:k].clamp_min(0).sqrt(), V.flip(1).T[:k]


def _truncate(W, C, G, usv, r, whiten, gram=None):
    """The rank-r factors (down (d, r), up (r, out)) of W under the cost of _weighted_svd (gram: its Wᵀ C W, G None,
    where the caller has it: the up factor from it, half the float64 products)."""
    U, S, Vh = usv
    if not whiten:
        P = U[:, :r]
        return P, P.T @ W                            # G = I: S_r V_rᵀ, exactly Algorithm 1's factors
    keep = S[:r] > S[0] * 1e-7                       # directions the calibration never excites stay zero
    Sr = torch.where(keep, S[:r], torch.ones_like(S[:r]))
    P = ((W if G is None else W @ G) @ Vh[:r].T / Sr) * keep   # = C^-½ U_r, since C^½ W G V_r = U_r S_r
    if gram is not None and G is None:               # Pᵀ C W = diag(keep / S_r) V_rᵀ (Wᵀ C W)
        return P, (Vh[:r] @ gram) / Sr[:, None] * keep[:, None]
    return P, P.T @ C @ W                            # C-weighted least squares: argmin_B E||x (W - P B)||²


def layer_moments(W_Q, W_K, W_V, W_O, C, mean, cfg: ModelConfig, kv_balance, gram_q=None):
    """What _rorope_layer needs of one layer whatever the candidate (d_r, fold): each KV group's query energy per
    frequency w (n_kv, d_h/2), the key moments per frequency Kf (d_h/2, n_kv, n_kv), and G, the block-diagonal
    square root of the cost weights. Computed once a layer: the (d, d) products are most of a candidate's cost.
    gram_q: W_Qᵀ C W_Q where the query's factorisation computed it (its diagonal blocks are E[q_h q_hᵀ])."""
    d, H, n_kv, d_h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g, half = H // n_kv, d_h // 2
    grp = torch.arange(H, device=C.device) // g                                   # head -> its KV group
    WQ, WK, WV = W_Q.view(d, H, d_h), W_K.view(d, n_kv, d_h), W_V.view(d, n_kv, d_h)
    if gram_q is None:
        Sq = torch.einsum("dhi,dhj->hij", WQ, (C @ W_Q).view(d, H, d_h))         # (H, d_h, d_h) E[q_h q_hᵀ]
    else:
        Sq = gram_q.view(H, d_h, H, d_h).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # its (h, h) blocks
    e_q = Sq.diagonal(dim1=1, dim2=2).reshape(n_kv, g, d_h).sum(1)                # (n_kv, d_h) query energy
    w = e_q[:, :half] + e_q[:, half:]                                             # (n_kv, d_h/2) per frequency
    Kc = torch.einsum("dji,dmi->ijm", WK, (C @ W_K).view(d, n_kv, d_h))          # (d_h, n_kv, n_kv)
    Kf = Kc[:half] + Kc[half:]                                                    # per frequency: both dims
    WO = W_O.view(H, d_h, d)
    MO = WO @ WO.transpose(1, 2)                                                  # (H, d_h, d_h) W_O,h W_O,hᵀ
    cov = C - mean[:, None] * mean[None, :]
    cov_v = torch.einsum("dji,djk->jik", WV, (cov @ W_V).view(d, n_kv, d_h))      # (n_kv, d_h, d_h)
    spread = torch.einsum("hij,hji->h", cov_v[grp], MO)                           # (H,) variance of v_h W_O,h
    # a score error δ moves head h's output by about δ times the spread of the values it mixes
    Gk = (kv_balance * spread[:, None, None] * Sq / d_h).view(n_kv, g, d_h, d_h).sum(1)
    Gv = MO.view(n_kv, g, d_h, d_h).sum(1)
    G = torch.block_diag(*[_sqrtm(m) for m in (*Gk, *Gv)])
    return dict(w=w, Kf=Kf, G=G)


def _rorope_layer(W_Q, W_K, W_V, W_O, C, mean, cfg: ModelConfig, pairs, weight_errors, kv_balance, fold=1,
                  moments=None):
    """One layer's RoRoPE split (float64, paper orientation). Returns W_KR (d, d_r), the coefficients A (n_kv, d_h/2,
    d_r/2) of each group's source frequency on each slot of the shared key, the joint no-RoPE matrix [K_res | V]
    (d, 2 n_kv d_h) and its column weights G (or None).
    fold f > 1 (frequency folding, after TransMLA's freqfold): the PCA runs jointly over f adjacent frequencies of all
    KV heads, and its top f/c components rotate at the group's kept frequencies. A component that mixes frequencies
    rotates at one of them: approximate, but more of the keys' energy lands in the rotating dims."""
    d, n_kv, d_h = cfg.dim, cfg.n_kv_heads, cfg.head_dim
    half, k = d_h // 2, len(pairs)
    m = moments or layer_moments(W_Q, W_K, W_V, W_O, C, mean, cfg, kv_balance)
    w, Kf = m["w"], m["Kf"]
    WK = W_K.view(d, n_kv, d_h)
    W_KR, A, K_res = W_K.new_zeros(d, 2 * k), W_K.new_zeros(n_kv, half, k), WK.clone()
    for freqs, slots in rope_groups(d_h, pairs, fold):
        if fold == 1:  # one frequency: the (n_kv, n_kv) key moment, weighted by √(query energy), mean 1
            i = freqs[0]
            s = (w[:, i] / w[:, i].mean().clamp_min(1e-30)).clamp_min(1e-12).sqrt()[:, None]  # (n_kv, 1)
            M = s * Kf[i] * s.T
        else:  # (n_kv f, n_kv f) joint moment of the group, both dims of each pair; plain PCA
            X1, X2 = (WK[:, :, cols].reshape(d, -1) for cols in (freqs, [i + half for i in freqs]))  # (d, n_kv f)
            M = X1.T @ C @ X1 + X2.T @ C @ X2
            s = torch.ones(n_kv, len(freqs), dtype=C.dtype, device=C.device)
        # the top principal mixes, descending: the t-th rotates at the group's t-th kept frequency (as TransMLA's; an
        # order by each component's own mean frequency measured worse, docs/init.md)
        U = torch.linalg.eigh(M)[1][:, -len(slots):].flip(1)
        U = U * torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))           # fixed signs: reproducible
        for t, slot in enumerate(slots):
            u = U[:, t].view(n_kv, len(freqs))                                    # (n_kv, f)
            for col, out in ((freqs, slot), ([i + half for i in freqs], slot + k)):  # rotate-half: (slot, slot + k)
                # (d,) k_r = Σ u s k; fold 1 keeps the unfolded init's own arithmetic (its bits, checked once by hand)
                kr = WK[:, :, col].reshape(d, -1) @ (u * s).reshape(-1) if fold > 1 else WK[:, :, col[0]] @ (
                    u * s)[:, 0]
                W_KR[:, out] = kr
                K_res[:, :, col] -= kr[:, None, None] * (u / s)[None]             # k_j,i - a_j,i k_r
            A[:, freqs, slot] = u / s
    W = torch.cat([K_res.reshape(d, n_kv * d_h), W_V], dim=1)                    # (d, 2 n_kv d_h)
    G = m["G"] if weight_errors else None
    return W_KR, A, W, G


@torch.no_grad()
def refit_values(student: Transformer, teacher: Transformer, ids, layers, batch_size=4, ridge=1e-2,
                 teacher_inputs=None):
    """Closed-form refits of W_UV and W_O in the MLA `layers` of `student` (in place), so each layer's attention
    output is what the teacher's was, as nearly as a linear map of what the student's attention now mixes can make it.
    The factorisations above fit weights; this fits outputs, after the approximate attention. Layer by layer in order
    over the calibration ids (N, T), the student on its own hidden states (those of the layers already refitted), the
    teacher on its own: a layer also makes up for what the layers before it lost.
      1. Per head h: W_UV,h = argmin E|W_UV,h z_h - o_h|², z_h (r_kv) the student's attention-weighted latent, o_h (d_h)
         the teacher's head output: least squares, one (r_kv, r_kv) system per head.
      2. Per layer: W_O = argmin E|W_O u - y|², u (H d_v) the student's head outputs after step 1, y (d) the teacher's
         attention output: least squares over all heads together, so heads make up for one another.
    Where r_kv <= d_v, W_UV,h is invertible and the two steps equal one joint fit of every W_O,h W_UV,h from all z_h
    (measured the same KL: docs/init.md), at the cost of o_proj-sized normal equations instead of (H r_kv)-sized ones.
    Both are ridge regressions toward the weights the factorisation gave, + lam |W - W0|² with lam = ridge times the
    mean eigenvalue: a direction the calibration barely excites keeps its init instead of being fitted to noise (which
    made a student fragile in bfloat16 at 1e-6, and overfitted a narrow calibration: docs/init.md), and an exact init
    stays exact. teacher_inputs: the teacher's attention inputs on ids, as calibrate(inputs=) keeps them (else one
    teacher pass here collects them: every converted layer's at once, N T d numbers each)."""
    dev = student.lm_head.weight.device
    T = ids.shape[1]
    pos = torch.arange(T, device=dev)
    rope_s, rope_t = student._rope(pos), teacher._rope(pos)
    if teacher_inputs is None:
        teacher_inputs = {}
        layer_inputs(teacher, ids, layers, lambda i, _b, x: teacher_inputs.setdefault(i, []).append(x), batch_size)
    hs = [student.model.embed_tokens(ids[b:b + batch_size].to(dev))          # the student's residual stream,
          for b in range(0, len(ids), batch_size)]                           # (B, T, d) each

    def solve(G, R, W0):  # argmin_W |Z W - Y|² + lam |W - W0|²: G = ZᵀZ (.., n, n), R = ZᵀY (.., n, m)
        lam = ridge * G.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        return torch.linalg.solve(G + lam * eye, R + lam * W0.double())

    with _bypassed(student, layers):  # latent norms are fitted afterwards, to the refitted layer
        for i, (bS, bT) in enumerate(zip(student.model.layers, teacher.model.layers)):
            if i > max(layers):  # nothing after the last converted layer is refitted
                break
            if i not in layers:
                hs = [bS(x, rope_s) for x in hs]
                continue
            a, at = bS.self_attn, bT.self_attn
            H, r, d_v = a.H, a.r_kv, a.d_v
            G = torch.zeros(H, r, r, dtype=torch.float64, device=dev)
            R = torch.zeros(H, r, d_v, dtype=torch.float64, device=dev)
            zs, ys = [], []
            for xs, xt in zip(hs, teacher_inputs.pop(i)):  # 1. W_UV per head
                z = a.mixed_latent(*a.project(bS.input_layernorm(xs), rope_s))        # (B, H, T, r_kv)
                o = at.heads(xt, rope_t)                                              # (B, T, H, d_h)
                ys.append(at.o_proj(o.flatten(2)))                                    # (B, T, d)
                zs.append(z)
                z, o = z.transpose(1, 2).flatten(0, 1).double(), o.flatten(0, 1).double()  # (B T, H, r_kv|d_h)
                G += torch.einsum("nhr,nhs->hrs", z, z)
                R += torch.einsum("nhr,nhd->hrd", z, o)
            W0 = a.W_UV.weight.view(H, d_v, r).transpose(1, 2)                        # (H, r_kv, d_v)
            a.W_UV.weight.copy_(solve(G, R, W0).transpose(1, 2).reshape(H * d_v, r))  # (H d_v, r_kv)
            W_UV = a.W_UV.weight.view(H, d_v, r)
            us = [torch.einsum("bhtr,hdr->bthd", z, W_UV).flatten(2) for z in zs]    # (B, T, H d_v): heads() again
            G = torch.zeros(H * d_v, H * d_v, dtype=torch.float64, device=dev)
            R = torch.zeros(H * d_v, ys[0].shape[-1], dtype=torch.float64, device=dev)
            for u, y in zip(us, ys):  # 2. W_O over all heads
                u, y = u.flatten(0, 1).double(), y.flatten(0, 1).double()              # (B T, H d_v), (B T, d)
                G += u.T @ u
                R += u.T @ y
            W = solve(G, R, a.o_proj.weight.T).T.to(a.o_proj.weight.dtype).contiguous()
            # a new tensor: with upcycle(copy=False) o_proj.weight is the teacher's own, which must not change
            a.o_proj.weight = torch.nn.Parameter(W, requires_grad=a.o_proj.weight.requires_grad)
            if i < max(layers):
                hs = [bS.finish(xs, a.o_proj(u)) for xs, u in zip(hs, us)]           # the student's next input


def allocate_ranks(spectra: dict, total: int):
    """Water-filling: per-layer ranks r_l >= 1 with sum r_l <= total minimising sum_l sum_{j > r_l} s_lj^2 for
    spectra {layer: singular values, descending}. Each layer's gains s_lj^2 fall with j, so taking the largest gains
    first (greedy) is optimal. Ranks never exceed a layer's number of singular values."""
    if total < len(spectra):
        raise BadInput(f"a budget of {total} ranks cannot give {len(spectra)} layers one each")
    gains = sorted(((-float(s[j]) ** 2, layer, j) for layer, s in spectra.items() for j in range(1, len(s))))
    ranks = {layer: 1 for layer in spectra}
    for neg, layer, _ in gains[:total - len(spectra)]:
        if neg < 0:
            ranks[layer] += 1
    return ranks


def native_bf16(device) -> bool:
    """Whether `device` multiplies bfloat16 natively: CUDA with bf16 support, or a CPU with AMX tiles. Emulated
    bfloat16 (AVX2, AVX-512 without AMX) is slower than float32 (a 1B-shaped forward measured ~10x slower), so the
    choice is the hardware's, not the user's; torch exposes the AMX check only as torch.cpu._is_amx_tile_supported."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _each_sequence(model: Transformer, idx, bf16, f, batch_size=4):
    """[f(j, logits (T, V) of sequence j, as the head computes them) for each sequence j of idx (N, T)]: one forward
    per batch_size sequences, the vocabulary projection a sequence at a time (a 128K vocabulary makes whole-batch
    float32 logits gigabytes). bf16: bfloat16 autocast (so bfloat16 logits) with the weights cast per use, not
    cached (a cached copy is another half of the model)."""
    out = []
    with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        for b in range(0, len(idx), batch_size):
            out += model(idx[b:b + batch_size], head_fn=lambda h, W: [f(b + j, F.linear(x, W))
                                                                      for j, x in enumerate(h)])
    return out


def _logprobs(logits):
    return logits.float().log_softmax(-1)                                         # softmax in float32


@torch.no_grad()
def calib_logits(model: Transformer, idx, bf16=False, batch_size=4):
    """The teacher's side of calib_kl: the logits (T, V) of each sequence of idx (N, T), in the head's dtype
    (bfloat16 under bf16: half of what float32 log-probs hold, 1 GiB at a 128K vocabulary and 2048 tokens; the
    log-softmax at each use gives the same bits)."""
    return _each_sequence(model, idx, bf16, lambda j, z: z, batch_size)


@torch.no_grad()
def head_logits(model: Transformer, h, bf16=False):
    """calib_logits from final hidden states h (B, T, d) already computed (calibrate's first_hidden): the head alone,
    a sequence at a time, in bfloat16 autocast under bf16."""
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        return [F.linear(x, model.lm_head.weight) for x in h]


@torch.no_grad()
def calib_kl(logits_t, student, idx, layers, bf16=False, batch_size=4):
    """KL(teacher || student) per token on idx (N, T), from the teacher's logits (calib_logits, computed once per
    upcycle), with the latent norms of `layers` bypassed (they are fitted after the choice). bf16: the forward in
    bfloat16 autocast (log-softmax in float32), for a score whose only use is to rank candidates; from SmolLM2's 23
    candidates at 25% it picked the student float32 picks, each score within 0.011 nats of float32's (two 0.004
    apart swapped places); a forward ran 1.5x (SmolLM2) to 3.5x (1B-shaped) faster (docs/init.md)."""
    def seq_kl(j, z, rows=128):  # float32 log-probs of `rows` tokens at a time: (T, V) float32 is 1/4 GiB at 128K
        return sum(token_kl(_logprobs(logits_t[j][a:a + rows]), _logprobs(z[a:a + rows])).sum()
                   for a in range(0, len(z), rows)) / len(z)

    with _bypassed(student, layers):  # no dropout here: train and eval mode compute the same
        kl = _each_sequence(student, idx, bf16, seq_kl, batch_size)
    return torch.stack(kl).mean().item()
