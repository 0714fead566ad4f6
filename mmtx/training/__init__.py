"""The training machinery around the model: what runs before, beside and after Lightning's fit loop."""
