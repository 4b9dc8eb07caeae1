"""Training profiles: the named sets of solver and training-net settings that `make train PROFILE=...` uses.

  paper   SPEC §4 exactly: Adam 1e-6, lr x0.9 four times per epoch, 5 epochs, pretrained conv1-3, the
          report's 0.96/0.04 class weights, dropout 0.5, batch 1. Every value comes from paper.py.
  fast    the toolkit's own recipe for a CPU and no pretrained weights (from scratch, MSRA + LSUV). It may
          change anything that leaves the deploy net identical (docs/results/recipe.md measures each choice).

`settings(name)` gives a profile with every key filled in (DEFAULTS, the report's values, for what a profile
leaves out). Keys:
  base_lr, lr_policy ("step" or "poly"), gamma and stepsize or lr_steps_per_epoch (step), power (poly),
  epochs or max_iter, pretrained, validations_per_epoch or validate_every, iter_size (images whose
  gradients are summed per update, Caffe's iter_size), batch_size (training net), class_weights
  (background, tumor), dropout (training-time ratio of drop6/drop7; 0 leaves them out of the training net,
  the deploy net keeps the report's layers, which are no-ops at test time), momentum2, pretrained_lr_mult
  (the lr multiplier of conv1_1..conv3_2: the report's 0.1 for transplanted weights), average (the decay of an
  exponential moving average of the weights that is validated and kept as the model, tools/averaging.py;
  None: the raw weights, as the report), decision (how a pixel is called tumor, tools/score.py: the report's
  argmax, or prior: tumor probability above w_tumor / (w_tumor + w_background)), narrow_start ((channels,
  iterations, base_lr): first train the same recipe, at this learning rate, on a net whose fc6/fc7 have only
  these channels, for these iterations, then widen it into the full net as its initialisation
  (tools/surgery.py's widen), which then trains `max_iter` iterations at `base_lr`; None: no narrow start,
  the report's), sampling (how training images are drawn, tools/sampling.py: "image", every augmented image
  once per epoch, the report's; "patient", every training patient equally often).
"""
import paper
from tools import sampling

DEFAULTS = {
    "base_lr": paper.BASE_LR, "lr_policy": paper.LR_POLICY, "gamma": paper.LR_GAMMA, "stepsize": None,
    "lr_steps_per_epoch": paper.LR_STEPS_PER_EPOCH, "power": None,
    "epochs": paper.EPOCHS, "max_iter": None, "pretrained": True,
    "validations_per_epoch": paper.VALIDATIONS_PER_EPOCH, "validate_every": None, "snapshot": None,
    "iter_size": 1, "batch_size": paper.BATCH_SIZE, "class_weights": paper.CLASS_WEIGHTS,
    "dropout": paper.DROPOUT_RATIO, "momentum2": paper.MOMENTUM2, "pretrained_lr_mult": paper.PRETRAINED_LR_MULT,
    "average": None, "decision": paper.DECISION_RULE, "narrow_start": None,
    "sampling": sampling.DEFAULT_SAMPLING,
}

PROFILES = {
    "paper": {},
    # docs/results/recipe.md measures each choice on fold 0 of the demo phantoms.
    "fast": {
        "pretrained": False,            # no FCN weights on a CPU-only machine: MSRA + LSUV (tools/lsuv.py)
        "pretrained_lr_mult": 1,        # ... so conv1-3 learn at the full rate, not the 0.1 meant for transplants
        "dropout": 0,                   # a few hundred batch-1 updates: dropout's noise only slows them down
        # A narrow start: 800 iterations (Adam 1e-4, poly to 0) of the same net with 512 fc6/fc7 channels,
        # 2.4x faster per iteration, where the full net fits ~400 in the time; then widened into the report's
        # net (the same function), which trains 100 more iterations at a rate low enough not to undo it.
        "narrow_start": (512, 800, 1e-4),
        "base_lr": 2e-5, "lr_policy": "poly", "power": 1,   # Adam, decayed linearly to 0 at max_iter
        "epochs": None, "max_iter": 100, "validate_every": 200, "snapshot": 200,
        "average": 0.98,                # validate and keep the moving average of the weights
        # balanced classes, read by argmax: they outline better than the report's 0.04/0.96 read at p > 0.96
        # (its prior shift undone), chiefly where a tumor touches the chest wall
        "class_weights": (0.5, 0.5), "decision": "argmax",
        # every training patient equally often: the smallest tumors (4 slices, where most patients have
        # 8-16) are otherwise too rare to be outlined well (fold 4's P004: 0.667 with "image", 0.795 with this)
        "sampling": "patient",
    },
}
DEFAULT_PROFILE = "paper"
LR_POLICIES = ("step", "poly")


def settings(name):
    """The named profile with every key of DEFAULTS (KeyError naming the choices for an unknown name)."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise KeyError("unknown profile %r (choose from %s)" % (name, ", ".join(sorted(PROFILES))))
    unknown = set(profile) - set(DEFAULTS)
    if unknown:
        raise KeyError("profile %r has unknown keys %s" % (name, sorted(unknown)))
    out = dict(DEFAULTS)
    out.update(profile)
    return out
