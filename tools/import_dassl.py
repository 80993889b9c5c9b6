"""Import a finished stage-1 run of the original code (a Dassl folder) as a run folder of this project.

What: the original repositories (CoOp, MaPLe, PromptSRC on Dassl; Koorye/DePT for CoOp + DePT and
MaPLe + DePT, the "+ DePT" rows of DPC's Fig. 5) save <run>/<name>/model.pth.tar-N, read here as plain
data (dassl_import.dassl_checkpoint: the pickled optimiser and scheduler objects are never run). Dassl records
no dataset, seed or class names, so the flags name them; a DePT head's rows are the base classes of
--data, in label order. The folder written is what train_backbone.py writes when it finishes:
checkpoint.pt (checkpoints.backbone_checkpoint, the learner's own tensors, no optimiser state: the
original's is over its whole model), args.json, log.txt and results.json (base-to-new accuracy computed
here on --data's test split). evaluate.py then lays it out like any run, DePT runs as "+ DePT", and a
plain one is a --backbone for train_dpc.py. PromptKD students need their teacher and are not imported
(train_dpc.py --backbone reads them directly, with --teacher).

    python tools/import_dassl.py DASSL_RUN --data eurosat --root /data --seed 1 --output-dir output/eurosat/coop_dept/seed1
    python evaluate.py output/eurosat/coop_dept    # the "CoOp + DePT" row
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import backbones  # noqa: E402
import checkpoints  # noqa: E402
import command_line  # noqa: E402
import dassl_import  # noqa: E402
import data  # noqa: E402
import prompts  # noqa: E402
import run_folder  # noqa: E402
import scoring  # noqa: E402
from run_folder import RunError, log  # noqa: E402

SHOTS = 16   # the base-to-new protocol every original config trains with (DATASET.NUM_SHOTS 16)


def get_args(argv=None):
    p = command_line.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dassl_run", help="the original code's run folder, holding <prompt_learner|PromptLearner|"
                                     "MultiModalPromptLearner|VLPromptLearner>/model.pth.tar-N")
    p.add_argument("--data", required=True, help="the dataset the run was trained on (its base classes; "
                                                 "Dassl records none), as train_backbone.py --data names it")
    p.add_argument("--root", default="data", help="folder holding the datasets")
    p.add_argument("--seed", type=int, default=1, help="the seed the run was trained with (Dassl records none)")
    p.add_argument("--clip", default="ViT-B/16",
                   help="the CLIP the run was trained on (a name, a .pt path, a Hugging Face folder or hub id)")
    p.add_argument("--dept-weight", type=float, default=prompts.DePT.WEIGHT,
                   help="DePT's λ the run was trained with, its fusion weight on base classes (Dassl records none; "
                        "DePT's TRAINER.LINEAR_PROBE.WEIGHT default)")
    p.add_argument("--output-dir", default=None, help="run folder (default output/<data>/<learner>[_dept]/seed<seed>)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --output-dir")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes (0 = in the main process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    command_line.add_feature_cache_flag(p)
    command_line.add_trust_flag(p)
    p.set_defaults(resume=None, shots=SHOTS, subsample="base")   # what check_run_folder and the record read (None: no --resume)
    args = p.parse_args(argv)
    args.data = data.dataset_name(args.data)
    args.dassl_run, args.root = os.path.abspath(args.dassl_run), os.path.abspath(args.root)
    args.clip = backbones.clip_path(args.clip)
    command_line.check_run_flags(args)
    if not 0 <= args.dept_weight <= 1:
        raise RunError(f"--dept-weight must be in [0, 1] (DePT's λ, 0.7), got {args.dept_weight}")
    return args


def main(args):
    path, name, state = dassl_import.dassl_checkpoint(args.dassl_run, args.trust_checkpoint)
    if name == "promptkd":
        raise RunError(f"{args.dassl_run} is a PromptKD student, which is not imported (it needs its teacher): pass "
                       f"it to train_dpc.py --backbone with --teacher")
    tail = path.rsplit("-", 1)[1]   # model.pth.tar-N was saved after epoch N (model-best: unknown)
    args.learner, args.dept, args.imported_from = name, dassl_import.is_dept(state), args.dassl_run
    args.epochs = int(tail) if tail.isdigit() else None
    args.output_dir = args.output_dir or os.path.join("output", args.data, name + "_dept" * args.dept, f"seed{args.seed}")
    command_line.check_not_a_source(args.output_dir, dassl_run=args.dassl_run)
    command_line.check_run_folder(args)   # takes the folder; a finished run stays unless --overwrite
    splits = data.load_splits(args.data, args.root, args.shots, args.seed)
    data.check_halves(splits, args.data, args.subsample)
    classnames = data.classnames_of(splits["base"]["train"])   # a DePT head's rows, in label order
    options = dassl_import.dassl_options(name, state, classnames, path)
    args.n_ctx, args.ctx_init = options["n_ctx"], options["ctx_init"]   # what rebuilds the prompt (load_backbone)
    learner = prompts.build_learner(name, backbones.load_clip(args.clip, args.device), None, **options,
                                    dept_weight=args.dept_weight)
    prompts.load_learner_state(learner, dassl_import.dassl_state(name, state))
    learner = learner.to(args.device).eval()
    args.clip_digest = scoring.clip_digest(learner.clip)   # the weights by content (command_line.same_clip)
    prompts.check_classnames(learner, data.classnames_of(splits["all"]["train"]))
    run_folder.start_run(args)
    log(f"imported {path}: {name}{' + DePT' if args.dept else ''}, {len(classnames)} base classes")

    results = scoring.base_to_new(learner, splits, args.device, args.workers, cache=args.feature_cache)
    scoring.log_results(results, f"{name} {'+ DePT' if args.dept else 'backbone'} (imported)")
    no_state = torch.optim.SGD(prompts.trainable_parameters(learner).values(), lr=0.0)   # never stepped
    run_folder.save_atomic(checkpoints.backbone_checkpoint(args, learner, classnames, args.epochs or 0, no_state, None, None, True),
                       os.path.join(args.output_dir, "checkpoint.pt"))
    run_folder.write_json_atomic(dict(results, kind="dept" if args.dept else "backbone", learner=name, data=args.data,
                                  seed=args.seed, shots=args.shots, epochs=args.epochs),
                             os.path.join(args.output_dir, "results.json"))
    return results


def run(argv=None):
    return command_line.run_cli(main, get_args, argv)


if __name__ == "__main__":
    run()
