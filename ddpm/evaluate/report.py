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
            ["checkpoint", f"step {ck['step']} (`{ck['path']}`), {'EMA' if ck['ema'] else 'raw'} weights"],
            ["config hash", m["config_hash"]], ["seed", m["seed"]], ["device", m["device"]]]
    if s["name"]:
        info.append(["sampler", f"{s['name']}, {s['steps']} steps" + (", x0 clipped to [-1, 1]" if s.get("clip_x0") else "")
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
    if "curves" in sec:
        x = sec["curves"]
        lines += ["## Training curves", "", f"{x['logged_steps']} logged steps ({x['first_step']}–{x['last_step']}), "
                  f"final loss {_f(x['final_loss'], 5)} (smoothed {_f(x['final_loss_smoothed'], 5)}).", ""]
        lines += _images(x)
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
        lines += ["## One-step denoiser", "",
                  f"Trained at σ = {x['train_sigma']:g}; MSE over {x['n']} test images.", ""]
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
