"""The paper's claims reproduced in miniature on the embedded arithmetic task (``python -m study``)."""
