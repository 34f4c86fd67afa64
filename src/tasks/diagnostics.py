"""Diagnostics of a deploy-scenario evaluation: trace files beside the results, plots under plots/.

With `--plotting_logits`, every sample's per-layer trace (ranks, confidences, max probabilities,
agreement, would-be exit layers) is pooled into one LayerTrace; the task metric of a static exit
at each decoder layer is measured too, and every plot of util.plots is drawn. With
`--render_jsds`, the discounted JSD of each candidate amateur layer per token is saved and drawn
as a heat map.
"""

import os
from typing import Callable, Dict, List, Optional

from tqdm import tqdm

from util.additional_args import AdditionalArguments, decoder_layers
from util.diagnostics import JsdTrace, LayerTrace, write_trace_files
from util.plots import plot_all

PLOTS_ROOT = "plots"


def pooled_trace(layer_traces: List[dict]) -> LayerTrace:
    """One LayerTrace over the tokens of every sample."""
    fields = ("ranks", "confidences", "max_probs", "agrees", "exit_layers")
    pooled = {name: [row for trace in layer_traces for row in trace[name]] for name in fields}
    return LayerTrace(num_layers=len(layer_traces[0]["ranks"][0]), **pooled)


def static_exit_metrics(evaluate: Callable[[AdditionalArguments], dict], model, metric: str
                        ) -> Dict[int, float]:
    """The task metric of a static exit at every decoder layer; each evaluation decodes with its
    own flags (generate's exit_args), the model's config is never changed. None on processes
    other than 0, which decode their shard but compute no metric."""
    results = {}
    for layer in tqdm(range(1, decoder_layers(model.config) + 1), desc="static exit per layer"):
        static = AdditionalArguments(deploy_scenario=True, static_exit_layer=layer)
        results[layer] = evaluate(static).get(metric)
    return results


def plots_run_name(output_dir: str, prefix: str) -> str:
    return os.path.basename(os.path.normpath(output_dir)) + ("" if prefix == "eval" else f"_{prefix}")


def check_plots_dirs(output_dir: str, prefixes: List[str], overwrite: bool) -> None:
    """Refuse a plots/<run name>/ folder that holds files (another run's, whose --output_dir has the
    same folder name?) unless --overwrite_output_dir, as for the results themselves."""
    for prefix in prefixes:
        folder = os.path.join(PLOTS_ROOT, plots_run_name(output_dir, prefix))
        if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
            raise ValueError(f"the plots of --output_dir {output_dir} go to {folder}, which holds another run's "
                             "plots (plots/ is named by the --output_dir folder name): choose an --output_dir "
                             "with another folder name or pass --overwrite_output_dir.")


def write_diagnostics(output_dir: str, prefix: str, layer_traces: List[dict], jsd_steps: List[dict],
                      static_metric: Optional[Dict[int, float]], metric: str) -> List[str]:
    """Trace files to <output_dir>/<prefix>_diagnostics/, plots to plots/<run name>/; returns the paths.
    An earlier run's figures there are removed first, so none is mixed with the new ones."""
    trace = pooled_trace(layer_traces) if layer_traces else None
    jsd = JsdTrace(steps=list(jsd_steps)) if jsd_steps else None
    run_name = plots_run_name(output_dir, prefix)
    folder = os.path.join(PLOTS_ROOT, run_name)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".png"):
                os.remove(os.path.join(folder, name))
    paths = write_trace_files(os.path.join(output_dir, f"{prefix}_diagnostics"), trace, jsd)
    paths += plot_all(trace, folder, static_metric=static_metric, jsd_trace=jsd,
                      run_name=run_name, metric_name=metric)
    return [str(p) for p in paths]
