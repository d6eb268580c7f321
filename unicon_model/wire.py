"""Names shared by the server and the sites for what travels in a Flower message.

Only these record keys appear in messages. Arrays are keyed by the model's own
parameter names, and metrics are scalars.
"""

from __future__ import annotations

# Message actions: "<message type>.<action>" routes to ``@app.<type>("<action>")``.
QUERY_SITE_INFO = "query.site_info"
QUERY_FISHER = "query.fisher"
TRAIN_STAGE = "train.stage"
EVALUATE_TASKS = "evaluate.tasks"

# Record keys of a server message.
TRAINABLE = "arrays"  # the stage's trainable tensors (always sent to a training site)
FROZEN = "frozen"  # parameter groups the site does not hold yet, cached by content hash
REFERENCE = "reference"  # stage-start values of shared tensors (L2-SP, LwF, EWC anchor)
FISHER = "fisher"  # merged diagonal Fisher of shared tensors (EWC)
CONFIG = "config"

# Record keys of a site reply.
METRICS = "metrics"
SITE_INFO = "site-info"
REASONS = "reasons"  # ConfigRecord of short reasons: a declined round, an undefined metric

NUM_EXAMPLES = "num-examples"  # always the number of training samples (cases or patches)
DECLINED = "declined"


def task_metric_key(task: str, metric: str) -> str:
    """Return the metric key of one task, for example ``ct_seg.dice``."""
    return f"{task}.{metric}"
