"""Markdown tables of a `twin bench` result (the JSON is the record; this is its reading copy)."""

from __future__ import annotations

import os

from .flops import RULES


def _f(x, fmt="{:,.0f}", na="—"):
    return na if x is None else fmt.format(x)


def _pct(x):
    return "—" if x is None else (f"{100 * x:.1f} %" if x >= 0.001 else f"{100 * x:.3f} %")


def markdown(res: dict) -> str:
    res = dict(res)
    errors = {k: res.pop(k)["error"] for k in ("floors", "kernels", "e2e", "scaling", "io")
              if isinstance(res.get(k), dict) and "error" in res[k]}
    m = res["meta"]
    out = [f"### `{m['command']}`", "",
           f"{m['date']}, {m['cpu']}, {m['cores']} cores ({m['threads']} OpenMP threads), "
           f"{m.get('memory_gib', '?')} GiB, Python {m['python']}, NumPy {m['numpy']}, HDF5 {m.get('hdf5', '?')}, "
           f"backend `{m['backend']}`, git {m['git_revision'][:12]}; suite runtime {m.get('runtime_s', 0):.0f} s"
           + (f"; load average {m['loadavg_at_start']:.1f} at start" if m.get("loadavg_at_start") is not None else "")
           + (f"; CPU steal {100 * m['cpu_steal_fraction']:.1f} %" if m.get("cpu_steal_fraction") is not None else "")
           + ".", ""]
    out += [f"**{k}: failed** ({v})" for k, v in errors.items()] + ([""] if errors else [])
    out += _headlines(res)
    if "floors" in res:
        f, mem = res["floors"]["flops"], res["floors"]["memory"]
        out += ["**Measured floors**", "",
                "| floor | 1 thread | all threads | how |", "|---|---:|---:|---|",
                f"| FLOP/s, vector FMA ({f['vector_width_doubles']} doubles) | {f['vector_1t_gflops']:.1f} GFLOP/s | "
                f"{f['vector_gflops']:.1f} GFLOP/s | {f['method']} |",
                f"| FLOP/s, scalar FMA | {f['scalar_1t_gflops']:.1f} GFLOP/s | {f['scalar_gflops']:.1f} GFLOP/s | "
                "same loop, one double per FMA (the shape of a per-patient kernel) |",
                f"| memory bandwidth | {mem['copy_1t_gbs']:.1f} GB/s | {mem['copy_gbs']:.1f} GB/s | {mem['method']} |"]
        if "blas" in res["floors"]:
            b = res["floors"]["blas"]
            out.append(f"| (reference) NumPy dgemm | | {b['gflops']:.1f} GFLOP/s | {b['method']} |")
        out += ["", f"Machine balance (vector FLOP/s ÷ copy bandwidth): "
                    f"{res['floors']['machine_balance_flop_per_byte']:.1f} flop/byte.", ""]
    if "kernels" in res:
        out += ["**Kernels** (throughput in the family's unit; counted GFLOP/s and fraction of the measured floor "
                "for ours; peers run in this process on a subset, answers checked against ours)", "",
                "| family | case | peer | n | wall s | throughput | counted GFLOP/s | % of floor | ours ÷ peer | max rel. diff |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["kernels"]:
            if r["status"] != "ok":
                note = f" ({r['note']})" if r.get("note") else ""
                out.append(f"| {r['family']} | {r['case']} | {r['peer']} | | | {r['status']}{note} | | | | |")
                continue
            t = r["throughput"]
            thr = f"{t:,.0f} {r['unit']}" if t >= 100 else f"{t:.3g} {r['unit']}"
            frac = _pct(r.get("fraction_of_floor"))
            if r.get("fraction_of_scalar_floor") is not None:
                frac += f" ({_pct(r['fraction_of_scalar_floor'])} scalar)"
            out.append(f"| {r['family']} | {r['case']} | {'**' + r['peer'] + '**' if r.get('ours') else r['peer']} | "
                       f"{r['n']:,} | {r['wall_s']:.3f} | {thr} | {_f(r.get('gflops'), '{:.2f}')} | {frac} | "
                       f"{_f(r.get('ours_speedup'), '{:,.1f}×')} | {_f(r.get('max_rel_diff'), '{:.1e}')} |")
        cases = {}
        for r in res["kernels"]:
            if r.get("ours") and "cpu_ms_per_cell_beat" in r:
                peer = next((q for q in res["kernels"] if q["case"] == r["case"] and not q.get("ours")
                             and q.get("cpu_ms_per_cell_beat")), None)
                cases[r["case"]] = (f"{r['case']}: {r['cpu_ms_per_cell_beat']:.2f} CPU-ms per cell-beat ({r.get('note', '')})"
                                    + (f"; {peer['peer']}: {peer['cpu_ms_per_cell_beat']:.2f} CPU-ms per cell-beat, "
                                       f"ours {peer['ours_speedup_per_cpu']:.1f}× per CPU-second" if peer else ""))
            elif r.get("ours") and r["family"] == "node-updates":
                xb = r.get("x_bandwidth_floor")
                cases[r["case"]] = (f"{r['case']}: {r['bytes_per_node']} B and {r['flops_per_node']} counted flops per "
                                    f"node-update (float64 arrays read/written once per step), {r['ms_per_step']:.2f} ms "
                                    f"per step ({r.get('note', '')})"
                                    + (f"; {xb:.1f}× the bandwidth floor (bytes × nodes ÷ copy bandwidth)" if xb else ""))
            elif r.get("ours") and r["family"] == "ligands":
                peer = next((q for q in res["kernels"] if q["case"] == r["case"] and not q.get("ours")
                             and q["status"] == "ok"), None)
                cases[r["case"]] = (f"{r['case']}: {1 / r['cpu_s']:.4f} ligands per CPU-second ({r.get('note', '')})"
                                    + (f"; {peer['peer']}: {1 / peer['cpu_s']:.4f} ligands per CPU-second "
                                       f"({peer.get('note', '')})" if peer else ""))
            elif r.get("ours") and "counting" in r:
                c = r["counting"]
                cases[r["case"]] = (f"{r['case']}: {c['rhs_flops']} flops/RHS ({c['rhs_transcendental']} transcendental) × "
                                    f"{c['rhs_evals_per_patient']:,.0f} RHS/patient + {c['step_flops']} flops/step × "
                                    f"{c['steps_per_patient']:,.0f} steps = {c['flops_per_patient'] / 1e6:.3f} MFLOP/patient "
                                    f"(counted on {c['counted_on_patients']} patients); arithmetic intensity "
                                    f"{r['arithmetic_intensity']:.0f} flop/byte of inputs+outputs → {r['floor']}")
        out += ["", f"Counted flops: {RULES}. Fraction of floor uses the roofline: the FLOP floor when the arithmetic "
                    "intensity is above the machine balance, else bandwidth × intensity.", ""]
        out += [f"- {v}" for v in cases.values()]
        out.append("")
    if "e2e" in res:
        e = res["e2e"]
        out += ["**End-to-end job** (`twin run` in this process, one rank)", "",
                "| job | patients | wall s | patients/s | shards written | counted GFLOP/s | % of floor |",
                "|---|---:|---:|---:|---:|---:|---:|",
                f"| {e['title']}; chunks of {e['chunk_size']}, backend {e['backend']}, {e['threads']} threads | "
                f"{e['n']:,} | {e['wall_s']:.2f} | {e['throughput']:,.0f} | {e['shard_bytes'] / 1e6:,.0f} MB "
                f"({e['write_mbs']:.0f} MB/s) | {e['gflops']:.2f} | {_pct(e.get('fraction_of_floor'))} |", "",
                f"Includes {e['what']}; flops counted as for the kernels "
                f"({e['counting']['flops_per_patient'] / 1e6:.3f} MFLOP/patient on its first {e['counting']['counted_on_patients']} patients).", ""]
    if "scaling" in res:
        s = res["scaling"]
        out += [f"**MPI scaling** (`{os.path.basename(str(s.get('launcher')).split()[0])} -n K twin run`, {s['threads_per_rank']} OpenMP thread(s) "
                f"per rank, {s['local_cores']} local cores, backend {s['backend']}, chunks of {s['chunk_size']})", ""]
        if s.get("skipped"):
            out += [f"skipped: {s['skipped']}", ""]
        else:
            out += ["| scaling | ranks | patients | run phase s | subprocess wall s | patients/s | efficiency | "
                    "efficiency (wall) | note |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
            for kind in ("weak", "strong"):
                for r in s[kind]:
                    note = (f"oversubscribed: {r['ranks']} ranks on {s['local_cores']} cores"
                            if r["oversubscribed"] else "")
                    out.append(f"| {kind} | {r['ranks']} | {r['patients']:,} | {_f(r['run_phase_s'], '{:.2f}')} | "
                               f"{r['subprocess_wall_s']:.2f} | {r['throughput']:,.0f} | {r['efficiency']:.2f} | "
                               f"{r['efficiency_subprocess_wall']:.2f} | {note} |")
            out += ["", f"Efficiency: strong T1/(K·TK), weak T1/TK; T = {s['timing']}.", ""]
    if "io" in res:
        io = res["io"]
        out += ["**HDF5 write vs raw write** (same bytes, same directory, median of interleaved repetitions; "
                "ratio = raw dd MB/s ÷ writer MB/s)", "",
                "| chunk | chunks × MB | engine (group commit) | raw dd (1 fsync) | **raw dd ÷ engine** | "
                "engine, commit per chunk | raw dd ÷ per chunk | raw + fsync per chunk | SHA-256 alone |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in io["results"]:
            b = r["mbs"]
            out.append(f"| {r['chunk_patients']:,} patients | {r['chunks']} × {r['chunk_mb']:.2f} | {b['engine']:.0f} MB/s | "
                       f"{b['raw_dd']:.0f} MB/s | **{r['ratio_raw_dd_over_engine']:.2f}×** | "
                       f"{b['engine_per_chunk']:.0f} MB/s | {r['ratio_raw_dd_over_engine_per_chunk']:.2f}× | "
                       f"{b['raw_sync']:.0f} MB/s | {r['sha256_mbs']:.0f} MB/s ({r['sha256_ms_per_chunk']:.1f} ms/chunk) |")
        out += ["", "engine = ShardWriter as `twin run` uses it: validate + SHA-256 (second thread, during the HDF5 "
                    "write) + HDF5 datasets per chunk, shard fsync + journal lines + journal fsync per group (16 MB or "
                    "1 s), close; commit per chunk = the same writer with two fsyncs per chunk; raw dd = os.write per "
                    "chunk, one fsync at the end (dd conv=fsync); raw + fsync = one fsync per chunk (dd oflag=dsync).", ""]
        for r in io["results"]:
            b = r.get("engine_breakdown_ms_per_chunk")
            if b:
                out.append(f"Where the time of a per-chunk commit goes, {r['chunk_patients']:,}-patient chunks "
                           f"({r['n_datasets_per_chunk']} datasets, {r['chunk_mb']:.2f} MB), ms per chunk: "
                           + ", ".join(f"{k} {v:.2f}" for k, v in b.items())
                           + f"; engine total {r['ms_per_chunk']['engine']:.2f} vs raw dd {r['ms_per_chunk']['raw_dd']:.2f}.")
        out.append("")
    return "\n".join(out)


def _headlines(res: dict) -> list[str]:
    h = []
    if "floors" in res:
        f, m = res["floors"]["flops"], res["floors"]["memory"]
        h.append(f"floors {f['vector_gflops']:.0f} GFLOP/s vector / {f['scalar_gflops']:.0f} scalar, "
                 f"{m['copy_gbs']:.0f} GB/s copy")
    s = res.get("scaling", {})
    for kind in ("weak", "strong"):
        rows = {r["ranks"]: r for r in s.get(kind, [])}
        if 1 in rows and 2 in rows:
            h.append(f"{kind}-scaling efficiency 1→2 ranks {rows[2]['efficiency']:.2f}")
    if "io" in res:
        io = res["io"]
        r = io["results"][0]
        h.append(f"IO: engine {r['mbs']['engine']:.0f} MB/s vs raw dd {r['mbs']['raw_dd']:.0f} MB/s = "
                 f"{r['ratio_raw_dd_over_engine']:.2f}× ({'within' if r['ratio_raw_dd_over_engine'] <= 2 else 'NOT within'} 2×) "
                 f"at {r['chunk_patients']:,}-patient chunks (commit per chunk: "
                 f"{r['ratio_raw_dd_over_engine_per_chunk']:.2f}×)")
    return [f"**Headlines:** {'; '.join(h)}.", ""] if h else []
