"""
A linear probe and its score, written out (no scikit-learn): AUC from ranks, an L2-regularized logistic
regression fit by Newton's method, stratified cross-validation, and the best single unit's AUC.
"""


import torch
import torch.nn.functional as F


def average_ranks(scores):
    """Ranks 1..n along dim 0 of scores, (n,) or (n, units) column by column, ties sharing the mean of their ranks:
    in sorted order, a value whose run of equal values spans positions start .. end - 1 (0-based) has `start`
    smaller values and `end` values <= it, so its rank is (start + 1 + end) / 2."""
    columns = scores.t() if scores.dim() == 2 else scores.unsqueeze(0)  # (units, n)
    ordered, order = columns.contiguous().sort(-1)  # contiguous: a sort along a strided dim is several times slower
    n = ordered.size(-1)
    position = torch.arange(n).expand_as(ordered)
    new_run = torch.ones_like(ordered, dtype=torch.bool)
    new_run[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # a run of equal values starts here
    start = torch.where(new_run, position, 0).cummax(-1).values
    run_ends = torch.ones_like(new_run)
    run_ends[:, :-1] = new_run[:, 1:]  # ... and the run ends here
    end = torch.where(run_ends, position + 1, n).flip(-1).cummin(-1).values.flip(-1)
    ranks = torch.empty_like(ordered, dtype=torch.float64).scatter_(-1, order, (start + end + 1).double() / 2.0)
    return ranks.t() if scores.dim() == 2 else ranks[0]


def auc(scores, labels):
    """Area under the ROC curve = P(score of a random positive > score of a random negative), a tie counting half:
    AUC = (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)  (Mann-Whitney)."""
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positives and {n_neg} negatives")
    ranks = average_ranks(scores.double())
    return ((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def fit_logistic(X, y, l2=1e-2, max_iter=50, tol=1e-9):
    """(w, b) minimizing J = mean_i BCE(sigmoid(x_i w + b), y_i) + l2 ||w||^2; X (n, d) standardized.

    With more features than examples (the gradient basis has ~10^5), the minimizer lies in the span of the
    examples (the representer theorem: a component of w orthogonal to every x_i changes no logit and only adds to
    ||w||^2), so the problem is solved in an orthonormal basis of that span: from the Gram matrix K = X X^T =
    U diag(s^2) U^T, the examples' coordinates are Z = U diag(s), and w = X^T U diag(1/s) beta. Either way it is a
    small logistic regression (at most n + 1 unknowns), solved by Newton's method (newton_logistic)."""
    n, d = X.shape
    if d <= n:
        return newton_logistic(X, y, l2, max_iter, tol)
    eigenvalues, U = torch.linalg.eigh(X @ X.t())
    span = eigenvalues > 1e-10 * eigenvalues.max()  # standardizing centers X: its span has at most n - 1 dims
    U, s = U[:, span], eigenvalues[span].sqrt()
    beta, b = newton_logistic(U * s, y, l2, max_iter, tol)
    return X.t() @ (U @ (beta / s)), b


def newton_logistic(Z, y, l2, max_iter, tol):
    """(w, b) minimizing J = mean_i BCE(sigmoid(z_i w + b), y_i) + l2 ||w||^2 by Newton's method, theta = (w, b):
    gradient g = A^T (p - y) / n + 2 l2 P theta, Hessian H = A^T diag(p (1 - p)) A / n + 2 l2 P, with A = [Z, 1],
    p = sigmoid(A theta) and P the identity without the bias; each step theta -= t H^{-1} g, t halved until J
    falls enough (Armijo), until the step is below tol. J is convex, so this is its minimum."""
    n, m = Z.shape
    A = torch.cat([Z, torch.ones(n, 1, dtype=Z.dtype)], dim=1)
    y = y.to(Z.dtype)
    penalty = torch.ones(m + 1, dtype=Z.dtype)
    penalty[-1] = 0.0  # the bias is not penalized

    def objective(theta):
        return F.binary_cross_entropy_with_logits(A @ theta, y) + l2 * (penalty * theta.square()).sum()

    theta = torch.zeros(m + 1, dtype=Z.dtype)
    for _ in range(max_iter):
        p = torch.sigmoid(A @ theta)
        gradient = A.t() @ (p - y) / n + 2 * l2 * penalty * theta
        hessian = (A.t() * (p * (1 - p))) @ A / n + torch.diag(2 * l2 * penalty)
        step = torch.linalg.solve(hessian, gradient)
        t, current = 1.0, objective(theta)
        while objective(theta - t * step) > current - 0.25 * t * (gradient @ step) and t > 1e-8:
            t /= 2
        theta = theta - t * step
        if (t * step).abs().max() < tol:
            break
    return theta[:-1], theta[-1]


def stratified_folds(labels, folds, seed=0):
    """(n,) fold index of each example: each class shuffled and dealt round-robin, so every fold has both."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for value in (False, True):
        idx = torch.nonzero(labels.bool() == value).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        fold[idx] = torch.arange(len(idx)) % folds
    return fold


def cv_auc(X, labels, folds=5, seed=0, l2=1e-2):
    """The cross-validated AUC of a logistic-regression probe: for each fold, standardize with the other folds'
    mean and std, fit on them, score the fold; the mean of the folds' AUCs."""
    X, labels = X.double(), labels.bool()
    fold = stratified_folds(labels, folds, seed)
    aucs = []
    for k in range(folds):
        train, test = fold != k, fold == k
        X_train = X[train]
        variance, mean = torch.var_mean(X_train, dim=0)
        std = variance.sqrt().clamp(min=1e-8)
        w, b = fit_logistic(X_train.sub_(mean).div_(std), labels[train], l2)  # in place: X can be large
        w = w / std  # the test examples' logits (x - mean) / std @ w + b, without a standardized copy of them
        aucs.append(auc(X[test] @ w + (b - mean @ w), labels[test]))
    return sum(aucs) / len(aucs)


def best_unit_auc(X, labels, seed=0):
    """How well the best single unit (a column of X) predicts the labels, either sign, without selection bias:
    the unit is chosen on one half of the examples (the largest |AUC - 0.5|) and its AUC, in the chosen direction,
    is measured on the other half. Returns (auc, unit)."""
    labels = labels.bool()
    fold = stratified_folds(labels, 2, seed)
    select, held_out = fold == 0, fold == 1
    n_pos = int(labels[select].sum())
    ranks = average_ranks(X[select])  # (n_select, units)
    aucs = (ranks[labels[select]].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * (len(ranks) - n_pos))
    unit = int((aucs - 0.5).abs().argmax())
    sign = 1.0 if aucs[unit] >= 0.5 else -1.0
    return auc(sign * X[held_out, unit], labels[held_out]), unit
