"""GFT inside other trainers, one module each (imported on demand: each needs its own framework).

    trl.py                GFTTrainer / GFTConfig on TRL's GRPOTrainer (trl>=1.16,<1.17)
    verl.py               verl's ``gft`` policy loss (a ``verl.plugins`` entry point) and the fused
                          log-prob + entropy op for verl's fused-kernel forward
    verl_fused_kernel.py  imported for its effect: verl's fused forward runs the op (external_lib)

PEFT needs no module of its own: a PEFT-wrapped model trains through ``gft_kernels.patch`` and
through ``trl.GFTTrainer`` unchanged (tests/integrations/test_peft.py).
"""
