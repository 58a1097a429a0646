"""Sequence-mixing ops apart from the modules that use them (as in mamba_ssm's ops/).

    dispatch        the kernel | reference knob, kernel loading, the record of the path that ran
    selective_scan  Mamba1's selective scan: sequential reference, numba CPU kernel, chunked PyTorch
    mamba3          Mamba-3's SISO scan: sequential reference and chunked PyTorch form
    s4d_kernel      S4D's convolution kernel from its parameters: blocked PyTorch reference, one numba
                    pass (discretisation and kernel) with a closed-form backward
    fft_conv        causal FFT convolution (S4D; S5 on GPUs): autograd reference, hand-written backward;
                    S4D's channels-last convolution with its skip as one node
    diag_scan       S5's diagonal complex recurrence: sequential reference, numba loops with a
                    hand-written adjoint (CPU)
    fused_cpu       numba kernels for the Mamba mixers' elementwise work on CPU: causal conv + SiLU,
                    gated RMSNorm, the end of the SSD backward (references in backbones.mamba2),
                    Mamba1's dt (low-rank projection + softplus), skip and gate (references in
                    backbones.mamba)

Each kernel has a pure reference beside it; the Triton kernels from mamba_ssm and fla are
checked against these references under TRITON_INTERPRET=1 (tests/test_kernels_interp.py).
"""
