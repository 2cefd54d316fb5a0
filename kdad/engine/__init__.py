"""Training, evaluation and prediction loops (the exportable model lives in kdad.models)."""
