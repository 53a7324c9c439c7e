"""``report.md`` of an evaluation: every figure and table of ``metrics.json``, readable on GitHub or in
any Markdown viewer (figures are referenced by relative path, next to the report)."""
from ddpm.run.evaluations import convention_symbol


def _f(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return out + [""]


def _images(section: dict) -> list[str]:
    return [f"![{f['file']}]({f['file']})" for f in section.get("figures", [])] + [""]


INCEPTION = (("inception_fid", "Inception FID", ".3f"), ("inception_score", "Inception score", ".3f"),
             ("kid", "KID", ".4g"), ("precision", "precision", ".3f"), ("recall", "recall", ".3f"))


def _score_table(rows: list[dict], sym: str, extra: list, conditional: bool, tail, tail_header) -> list[str]:
    """The per-scale table of a sample section: scale, count, classifier scores, Inception scores (only
    the columns that were measured), then the section's own columns."""
    inception = [(k, h, spec) for k, h, spec in INCEPTION if any(r.get(k) is not None for r in rows)]
    return _table([sym] + extra + ["samples", "label accuracy", "feature-FID"] + [h for _, h, _ in inception]
                  + tail_header,
                  [[f"{r['scale']:g}" if conditional else "none"] + ([f"{r['gamma']:g}"] if extra else [])
                   + [r["n"], r["accuracy"], r["feature_fid"]] + ["n/a" if r.get(k) is None else format(r[k], spec) for k, _, spec in inception]
                   + tail(r) for r in rows])


def render(m: dict) -> str:
    """Markdown for a metrics dict as written by :func:`ddpm.evaluate.parts.run`."""
    ck, s, g = m["checkpoint"], m["sampler"], m["guidance"]
    clf = m["classifier"]
    lines = [f"# Evaluation of `{m['run_name']}` at step {ck['step']}", "",
             f"Written by `{m['command'] or 'ddpm.evaluate.parts.run'}` on {m['created']}.", ""]
    info = [["run dir", f"`{m['run_dir']}`"], ["objective / data", f"{m['objective']} / {m['dataset']}"],
            ["checkpoint", f"step {ck['step']} (`{ck['path']}`), {'EMA' if ck['ema'] else 'raw'} weights"
                           + _best(ck)],
            ["config hash", m["config_hash"]], ["seed", m["seed"]], ["device", m["device"]]]
    if s["name"]:
        info.append(["sampler", f"{s['name']}, {s['steps']} steps" + (", x0 clipped" if s.get("clip_x0") else "")
                     + (f", eta {s['eta']:g}" if s.get("eta") else "") + (f" ({s['note']})" if s["note"] else "")])
        info.append(["fast sampler (progression, interpolation)", f"{s['fast_sampler']}, {s['fast_steps']} steps"])
        if g["conditional"]:
            info.append(["guidance", f"{g['convention']} convention: {', '.join(f'{x:g}' for x in g['scales'])} "
                                     f"(single-scale figures use {g['display_scale']:g})"])
        else:
            info.append(["guidance", "none (unconditional model)"])
    info.append(["classifier", f"`{clf['path']}` (test accuracy {_f(clf['test_accuracy'], 4)})" if clf
                 else (m["classifier_note"] or "not used")])
    if clf and clf.get("subset_note"):
        info.append(["classifier data", f"**subset**: {clf['subset_note']}"])
    if m["inception"]:
        inc = m["inception"]
        info.append(["Inception weights", f"`{inc['path']}` (sha256 {inc['sha256'][:12]}…), torch-fidelity "
                     f"{inc.get('torch_fidelity')}, reference: the training split"
                     + (f" (first {inc['reference_images']} images)" if inc.get("reference_images") else "")])
    if m.get("classifier_guidance"):
        cg = m["classifier_guidance"]
        info.append(["classifier guidance", f"noisy classifier `{cg['classifier_guidance']}`, step {cg['cg_step']} "
                     f"({'EMA' if cg['cg_ema'] else 'raw'}), scales {', '.join(f'{v:g}' for v in cg['cg_scale'])}"])
    if m.get("mixture"):
        info.append(["class mixture", f"`--mix {m['mixture']}`"])
    info.append(["versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items())])
    lines += _table(["", ""], info)
    lines += [f"> **Note:** {n}" for n in m.get("notes", [])] + ([""] if m.get("notes") else [])
    sec = m["sections"]
    if "guidance" in sec:
        x = sec["guidance"]
        sym = convention_symbol(g["convention"])
        lines += ["## Samples and guidance sweep", "",
                  f"{x['rows'][0]['n']} samples per scale ({x['per_class']} per class), {x['sampler']} with "
                  f"{x['steps']} steps. Label accuracy: fraction of samples the classifier assigns to the requested "
                  "class. Feature-FID: Fréchet distance of the classifier's penultimate features to the test set "
                  "(only comparable between evaluations with the same classifier and sample count).", ""]
        extra = ["γ = 1 + w"] if sym == "w" else []
        lines += _score_table(x["rows"], sym, extra, g["conditional"],
                              lambda r: [r["wall_s"], f"`{r['group']}`"], ["seconds", "archive group"])
        lines += _images(x)
    if "fid" in sec:
        x = sec["fid"]
        sym = convention_symbol(g["convention"])
        lines += ["## Paper-scale metrics (--fid-samples)", "",
                  f"{x['n']} samples per scale, {x['sampler']} with {x['steps']} steps, made by jobs.sample's "
                  "sharded requests. Inception metrics via torch-fidelity against the training split: FID and KID "
                  "(lower is better), Inception score, precision and recall (higher is better); comparable with "
                  "papers that use the same Inception weights and sample count.", ""]
        lines += _score_table(x["rows"], sym, ["γ = 1 + w"] if sym == "w" else [], g["conditional"],
                              lambda r: [r["score_s"], f"`{r['file']}`"], ["scoring seconds", "samples file"])
    if "real_rows" in sec:
        x = sec["real_rows"]
        lines += ["## Samples above real training images", "", f"Per guidance scale: the first {x['per_class']} "
                  f"samples of every class (rows 1–{x['per_class']}) above as many random images of the "
                  f"{x['train_images']} training images (rows {x['per_class'] + 1}–{2 * x['per_class']}), one class "
                  "per column; then a preview of the training data.", ""]
        lines += _images(x)
    if "classifier_guidance" in sec:
        lines += _cg(sec["classifier_guidance"])
    if "mixture" in sec:
        lines += _mixture(sec["mixture"])
    if "curves" in sec:
        lines += _curves(sec["curves"])
    if "progression" in sec:
        x = sec["progression"]
        lines += ["## Progression across checkpoints", "",
                  f"Checkpoints {', '.join(map(str, x['checkpoint_steps']))}; {x['sampler']} {x['steps']} steps.", ""]
        lines += _images(x)
    if "gifs" in sec:
        x = sec["gifs"]
        gifs = [f for f in x["figures"] if f["file"].endswith(".gif")]
        lines += ["## Denoising trajectories", "", f"{x['sampler']} with {x['steps']} steps, {x['frames']} frames "
                  "per GIF: x_t on the left, the predicted clean image x̂0 on the right.", ""]
        lines += [" ".join(f"![{f['file']}]({f['file']})" for f in gifs), ""]
        lines += _images({"figures": [f for f in x["figures"] if f not in gifs]})
    if "steps" in sec:
        x = sec["steps"]
        lines += ["## Sampler steps vs quality", "", f"{x['n']} samples per setting from the same noise, scale "
                  f"{x['scale']:g}. Small samples: compare rows with each other, not with the sweep above.", ""]
        lines += _table(["sampler", "steps", "network evaluations", "seconds", "label accuracy", "feature-FID"],
                        [[r["sampler"], r["steps"], r["evaluations"], r["wall_s"], r["accuracy"], r["feature_fid"]]
                         for r in x["rows"]])
        lines += _images(x)
    if "interpolation" in sec:
        x = sec["interpolation"]
        lines += ["## Interpolation", "", f"slerp between two noises per row, decoded with {x['sampler']} "
                  f"({x['steps']} steps, deterministic).", ""]
        lines += _images(x)
    if "denoiser" in sec:
        x = sec["denoiser"]
        lo, hi = x.get("image_range", (-1, 1))
        lines += ["## One-step denoiser", "", f"Trained at σ = {x['train_sigma']:g}; MSE over {x['n']} test images. "
                  f"σ and the MSE are on the scale of the images the model sees, [{lo:.3g}, {hi:.3g}] "
                  "(data.normalize).", ""]
        lines += _table(["σ", "MSE of the noisy input", "MSE of the denoised output"],
                        [[a, b, c] for a, b, c in zip(x["sigmas"], x["mse_noisy"], x["mse_denoised"])])
        lines += _images(x)
    if "accuracy_vs_t" in sec:
        x = sec["accuracy_vs_t"]
        lines += ["## Noisy classifier accuracy vs timestep", "",
                  f"{x['n']} test images; chance {x['chance']:.0%}.", ""]
        lines += _table(["t", "accuracy"], [[t, a] for t, a in zip(x["t"], x["accuracy"])])
        lines += _images(x)
    lines += ["## Files", "", f"Samples: `{m['archive']['path']}`, groups "
              + (", ".join(f"`{x}`" for x in m["archive"]["groups"]) or "none") + "."]
    if m["export_npz"]:
        lines += [f"npz export: `{m['export_npz']['path']}` ({m['export_npz']['images']} images, arr_0 / arr_1)."]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()), ""]
    return "\n".join(lines)


def _best(ck: dict) -> str:
    """', the checkpoint checkpoints/best names' or where that one is (runs with checkpoint.best)."""
    best = ck.get("best_step")
    if best is None:
        return ""
    if best == ck["step"]:
        return "; this is `checkpoints/best` (the lowest held-out loss)"
    return f"; `checkpoints/best` (the lowest held-out loss) is step {best}: evaluate it with `--checkpoint best`"


def _curves(x: dict) -> list[str]:
    lines = ["## Training curves", "", f"{x['logged_steps']} logged steps ({x['first_step']}–{x['last_step']}), "
             f"final loss {_f(x['final_loss'], 5)} (smoothed {_f(x['final_loss_smoothed'], 5)})"
             + (f", final held-out loss {_f(x['final_test_loss'], 5)}" if x.get("final_test_loss") is not None else "")
             + ".", ""]
    lines += _images(x)
    epochs = x.get("epochs") or []
    if epochs:
        best = (x.get("best") or {}).get("step")
        lines += ["Per epoch: the mean training loss and the held-out loss (the same objective on the first test-split "
                  "images, each with fixed noise; `test_loss` in metrics.jsonl) at the epoch's end.", ""]
        lines += _table(["epoch", "last step", "training loss", "held-out loss", ""], [
            [e["epoch"], e["step"], _f(e["train_loss"], 5), _f(e["test_loss"], 5),
             ("checkpoints/best" if e["step"] == best else "") + ("" if e["complete"] else "(partial epoch)")]
            for e in epochs])
    return lines


def _cg(x: dict) -> list[str]:
    sym = convention_symbol(x["convention"])
    lines = ["## Classifier guidance vs classifier-free guidance", "",
             "Classifier guidance (Dhariwal & Nichol 2021) by the noisy classifier "
             f"`{x['classifier']['classifier_guidance']}`"
             f" (step {x['classifier']['cg_step']}) on the run's unconditional prediction, scale s; classifier-free "
             f"guidance ({sym}) from the sweep above. {x['rows'][0]['n']} samples per scale with the same noise and "
             "classes, scored by the evaluation classifier.", ""]
    lines += _table(["method", "scale", "label accuracy", "feature-FID", "ms per image", "archive group"],
                    [["CG", f"s={r['scale']:g}", r["accuracy"], r["feature_fid"], r["ms_per_image"], f"`{r['group']}`"]
                     for r in x["rows"]] + [["CFG", f"{sym}={r['scale']:g}", r["accuracy"], r["feature_fid"],
                                             r["ms_per_image"], f"`{r['group']}`"] for r in x["cfg_rows"]])
    if x["matched"]:
        lines += ["Matched label accuracy: each classifier-guidance scale with the classifier-free scale of the "
                  "closest accuracy.", ""]
        lines += _table(["CG scale", "CG accuracy", "CG feature-FID", "CG ms/image", f"CFG {sym}", "CFG accuracy",
                         "CFG feature-FID", "CFG ms/image", "accuracy gap"],
                        [[f"{p['cg_scale']:g}", p["cg_accuracy"], p["cg_feature_fid"], p["cg_ms_per_image"],
                          f"{p['cfg_scale']:g}", p["cfg_accuracy"], p["cfg_feature_fid"], p["cfg_ms_per_image"],
                          p["accuracy_gap"]] for p in x["matched"]])
    elif not x["cfg_rows"]:
        lines += ["An unconditional run has no classifier-free guidance: the classifier-guidance curve only.", ""]
    return lines + _images(x)


def _mixture(x: dict) -> list[str]:
    a, b = x["class_names"][:2]
    lines = ["## Class mixture", "", f"`--mix {x['mix']}`: eps_u + Σ w_i (eps_ci − eps_u), the conjunction of Liu "
             f"et al. 2022 (Composable Diffusion), in one batched forward. The sweep weights class {a} by 2(1−λ) and "
             f"class {b} by 2λ times their given weights: the middle column is the mix as given.", ""]
    lines += _table(["λ", "mix", "samples", f"classified as {a}", f"classified as {b}"],
                    [[f"{r['lambda']:.3g}", f"`{r['mix']}`", r["n"], r["share_a"], r["share_b"]] for r in x["rows"]])
    return lines + _images(x)
