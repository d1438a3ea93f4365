"""Forward sensitivities by model augmentation: the kernels integrate them with the states.

For estimated parameters theta_j (in log scale, phi_j = log theta_j) the augmented model has, for
every state y_i, a state S_ij = dy_i/dphi_j with

    dS_ij/dt = sum_k df_i/dy_k S_kj + theta_j df_i/dtheta_j,   S_ij(0) = theta_j dy_i(0)/dtheta_j

and, for every recorded output g, an output dg/dphi_j = sum_k dg/dy_k S_kj + theta_j dg/dtheta_j.
Both are directional derivatives, written with `kernels.ode.symbolic.diff` against a dummy
variable: states carry their sensitivity state as derivative, theta_j carries theta_j, and the
model's intermediates carry extra intermediates. The result is an ordinary `Model`, so the NumPy,
C/OpenMP and CUDA backends compile and integrate it like any other (one patient per thread), with
the same adaptive step control over states and sensitivities (the error norm covers both).

Doses: a bolus of amount*F into a state makes S(state, F) jump by amount*F (d/dlogF); other
sensitivities do not jump. An infusion whose rate scales with an estimated parameter is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.ode.integrate_numpy import EVENT_STATE, Events
from kernels.ode.model import BolusTarget, InfusionTarget, Model, Output, State
from kernels.ode.symbolic import diff

_EPS = "zz_sens_direction"  # dummy differentiation variable: appears in no model


def sens_state(state: str, par: str) -> str:
    return f"S_{state}__{par}"


def sens_output(out: str, par: str) -> str:
    return f"dout_{out}__{par}"


@dataclass
class SensitivityModel:
    base: Model
    model: Model  # augmented declaration
    params: list[str]  # estimated parameters (log scale)
    outputs: list[str]  # observed outputs of the base model

    def record(self) -> list[str]:
        """Record list: each output, then its sensitivities to each parameter."""
        return self.outputs + [sens_output(o, p) for o in self.outputs for p in self.params]

    def split(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """samples [n_rec, m, T] -> values [n_out, m, T] and sensitivities [n_out, n_par, m, T]."""
        n_o, n_p = len(self.outputs), len(self.params)
        vals = samples[:n_o]
        sens = samples[n_o:].reshape(n_o, n_p, *samples.shape[1:])
        return vals, sens

    def events(self, base_events: Events, P: np.ndarray, dose_fraction: np.ndarray | None = None) -> Events:
        """Base events plus the jumps of sensitivity states; `dose_fraction` [n_events, m] gives the
        index of the fraction parameter of each bolus (-1: none)."""
        if dose_fraction is None or not base_events.time.size:
            return base_events
        pn = self.base.parameter_names
        extra_t, extra_g, extra_v = [], [], []
        for p in self.params:
            j = pn.index(p)
            hit = (dose_fraction == j) & (base_events.kind == EVENT_STATE) & np.isfinite(base_events.time)
            if not hit.any():
                continue
            tgt = np.where(hit, base_events.target, 0)
            names = self.model.state_names
            idx = np.array([names.index(sens_state(self.base.state_names[k], p)) for k in
                            range(len(self.base.states))], np.int16)
            extra_t.append(np.where(hit, base_events.time, np.inf))
            extra_g.append(idx[tgt])
            extra_v.append(np.where(hit, base_events.value, 0.0))
        if not extra_t:
            return base_events
        tt = np.concatenate([base_events.time, *extra_t])
        kk = np.concatenate([base_events.kind, *[np.full(t.shape, EVENT_STATE, np.int8) for t in extra_t]])
        gg = np.concatenate([base_events.target, *extra_g]).astype(np.int16)
        vv = np.concatenate([base_events.value, *extra_v])
        order = np.argsort(tt, axis=0, kind="stable")
        take = lambda a: np.ascontiguousarray(np.take_along_axis(a, order, axis=0))  # noqa: E731
        return Events(take(tt), take(kk), take(gg), take(vv))


def augment(model: Model, params: list[str], outputs: list[str]) -> SensitivityModel:
    """The model with forward sensitivities of `outputs` (outputs or states) w.r.t. log `params`."""
    unknown = [p for p in params if p not in model.parameter_names]
    if unknown:
        raise ValueError(f"model {model.name}: no parameter(s) {unknown} (has {model.parameter_names})")
    bad_out = [o for o in outputs if o not in model.observable()]
    if bad_out:
        raise ValueError(f"model {model.name}: no output or state {bad_out}")
    for route, tgt in model.doses.items():
        if isinstance(tgt, InfusionTarget) and tgt.fraction in params:
            raise ValueError(f"model {model.name}: estimating {tgt.fraction} (fraction of infusion route {route}) "
                             "is not supported")
    out_expr = {o.name: o.expr for o in model.outputs}
    states = list(model.states)
    exprs = list(model.expressions)
    derivs = dict(model.derivatives)
    new_outputs = [Output(o, out_expr.get(o, o), model.unit_of(o)) for o in outputs]
    for p in params:
        known = {s: sens_state(s, p) for s in model.state_names}
        known[p] = p  # d theta / d log theta
        for name, e in model.expressions:
            d = diff(e, _EPS, known)
            if d != "0":
                nm = f"dx_{name}__{p}"
                exprs.append((nm, d))
                known[name] = nm
        for s in model.states:
            init = s.init if isinstance(s.init, str) else None
            d0 = diff(init, _EPS, {p: p}) if init is not None else "0"
            states.append(State(sens_state(s.name, p), d0 if d0 != "0" else 0.0, "", f"d {s.name} / d log {p}"))
            derivs[sens_state(s.name, p)] = diff(model.derivatives[s.name], _EPS, known)
        for o in outputs:
            new_outputs.append(Output(sens_output(o, p), diff(out_expr.get(o, o), _EPS, known), ""))
    doses = {r: (BolusTarget(t.state, t.fraction) if isinstance(t, BolusTarget) else t) for r, t in model.doses.items()}
    aug = Model(name=f"{model.name}__sens_{'_'.join(params)}", description=f"{model.name} with forward sensitivities",
                time_unit=model.time_unit, states=states, parameters=list(model.parameters), derivatives=derivs,
                outputs=new_outputs, expressions=exprs, inputs=list(model.inputs), doses=doses,
                reference=model.reference)
    return SensitivityModel(model, aug, list(params), list(outputs))
