"""Reading results: loading run folders (:mod:`.data`), bootstrap statistics (:mod:`.stats`),
tables (:mod:`.tables`), plots (:mod:`.plots`) and the rendered report (:mod:`.render`,
:mod:`.report`). It reads result files only, never W&B, and runs no model."""
