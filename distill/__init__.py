"""draftsmith.distill."""
