"""The report's numbers: TS-FCN (Stanford CS231n 2016), as SPEC.md §2-§7 states them.

Every module takes these values from here; tests/test_paper.py checks them against docs/SPEC.md's
tables (a copy of the project's SPEC). Where the report is ambiguous, the default is given here and the
alternative is one option away (SPEC §7). The training profiles built from these numbers, and the
toolkit's own `fast` recipe, are in solver/profiles.py.
"""

# --- §2 the network --------------------------------------------------------------------------------
INPUT_SIZE = 100                 # 100x100 crops
INPUT_CHANNELS = 3               # grey copied to B, G, R
NUM_CLASSES = 2                  # background, tumor
TUMOR = 1
CONV_BLOCKS = ((64, 2), (128, 2), (256, 2))   # (channels, convolutions) of blocks 1-3, 3x3 kernels
CONV1_1_PAD = 32                 # the FCN trick that makes room for fc6's 7x7
FC6_CHANNELS, FC6_KERNEL = 4096, 7
FC7_CHANNELS = 4096
DROPOUT_RATIO = 0.5
UPSCORE_KERNEL, UPSCORE_STRIDE = 16, 8
CROP_OFFSET_CENTER = 14          # the report's "center" crop: (128 - 100) / 2
CROP_MODES = ("center", "aligned")   # aligned: the offset caffe.coord_map derives (11)
DEFAULT_CROP_MODE = "center"
PRETRAINED_LAYERS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2")
PRETRAINED_LR_MULT = 0.1         # weights; biases get twice that, no decay
# Blob sides (H = W) in real Caffe for a 100x100 input.
BLOB_SIDES = {"conv1_1": 162, "pool1": 81, "pool2": 41, "pool3": 21, "fc6": 15, "fc7": 15,
              "score": 15, "upscore": 128, "score_crop": 100}
PARAMETERS_APPROX = 68e6
FORWARD_GFLOP_APPROX = 38.0

# --- §3 the loss -----------------------------------------------------------------------------------
CLASS_WEIGHTS = (0.04, 0.96)     # (background, tumor)
LOSS_NORMALIZE = True            # divide by the pixel count; False: plain sum (Fig. 2 as printed)

DECISION_RULE = "argmax"         # a pixel is tumor where its tumor score is the larger (probability > 0.5)

# --- §4 learning -----------------------------------------------------------------------------------
SOLVER_TYPE = "Adam"
BASE_LR = 1e-6
MOMENTUM, MOMENTUM2, DELTA = 0.9, 0.999, 1e-8
LR_POLICY, LR_GAMMA = "step", 0.9
LR_STEPS_PER_EPOCH = 4           # stepsize = ceil(epoch / 4)
WEIGHT_DECAY = 5e-4
BATCH_SIZE = 1
EPOCHS = 5
VALIDATIONS_PER_EPOCH = 10       # Fig. 5: validation Dice every 1/10 epoch
REPORT_HOURS, REPORT_ITERATIONS = 7, 100_000
REPORT_VAL_DICE_3D = 0.86
REPORT_TEST_DICE_3D = 0.83

# --- §5 data preparation ---------------------------------------------------------------------------
BOX_MIN_SIDE = 100               # box side = max(100, 2 x largest in-plane tumor extent)
BOX_SCALE = 2
BOX_MODES = ("patient", "slice")  # one box per patient (default) or one per slice
DEFAULT_BOX_MODE = "patient"
AIR_HU = -1000                   # padding where the box leaves the image
HU_WINDOW = (-2000, 4095)        # mapped linearly to 0..255, clipped
FCN_BGR_MEAN = (104.00699, 116.66877, 122.67892)
LABEL_THRESHOLD = 0.5            # after resizing the label like the image
AUGMENTATIONS = 8                # 4 rotations x mirror
N_FOLDS = 5                      # by patient; the remainder goes to the last fold
SEED = 0
ROI_REGEX = r"gtv|tumou?r|lesion|mass|nodule"   # case-insensitive
RESIZE_MODES = ("bilinear", "antialias")   # box -> 100x100: pixel-centre bilinear, or widened with the reduction
DEFAULT_RESIZE = "bilinear"
