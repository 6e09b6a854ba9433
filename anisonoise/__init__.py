"""anisonoise: the noise structure of gradient methods as composable objects.

Transforms (Table 1 of Zhu et al., ICML 2019) chain in front of any optax
optimizer; the engine beneath them (per-example gradients, covariance and
Hessian products, Lanczos) never forms a ``D x D`` matrix.
"""

from anisonoise._src.batching import map_chunks
from anisonoise._src.batching import num_examples
from anisonoise._src.blocks import param_block
from anisonoise._src.blocks import param_blocks
from anisonoise._src.covariance import covariance_diagonal
from anisonoise._src.covariance import covariance_operator
from anisonoise._src.covariance import covariance_trace
from anisonoise._src.covariance import per_example_grads
from anisonoise._src.covariance import sample_sgd_noise
from anisonoise._src.covariance import sgd_noise_sampler
from anisonoise._src.curvature import EigenResult
from anisonoise._src.curvature import hessian_operator
from anisonoise._src.curvature import hvp
from anisonoise._src.curvature import top_eigenpairs
from anisonoise._src.diagnostics import GradientNoiseNorms
from anisonoise._src.diagnostics import HessianSpectrum
from anisonoise._src.diagnostics import OUEscapeEfficiency
from anisonoise._src.diagnostics import SpectralDensity
from anisonoise._src.diagnostics import escape_indicator
from anisonoise._src.diagnostics import escape_ratio
from anisonoise._src.diagnostics import expected_sharpness
from anisonoise._src.diagnostics import gradient_noise_norms
from anisonoise._src.diagnostics import hessian_spectrum
from anisonoise._src.diagnostics import hessian_trace
from anisonoise._src.diagnostics import isotropic_escape_indicator
from anisonoise._src.diagnostics import ou_escape_efficiency
from anisonoise._src.diagnostics import projection_coefficient
from anisonoise._src.diagnostics import spectral_density
from anisonoise._src.dynamics import DYNAMICS
from anisonoise._src.dynamics import FAMILY_DYNAMICS
from anisonoise._src.dynamics import dynamics_noise
from anisonoise._src.estimators import MonteCarloEstimate
from anisonoise._src.family import AnticorrelatedNoiseState
from anisonoise._src.family import MultiplicativeNoiseState
from anisonoise._src.family import anticorrelated_noise
from anisonoise._src.family import multiplicative_noise
from anisonoise._src.refresh import DiagonalFactor
from anisonoise._src.refresh import DiagonalNoiseState
from anisonoise._src.refresh import DynamicIsotropicNoiseState
from anisonoise._src.refresh import HessianEigvecNoiseState
from anisonoise._src.refresh import HessianNoiseState
from anisonoise._src.refresh import IsotropicNoiseState
from anisonoise._src.refresh import LeadingNoiseState
from anisonoise._src.refresh import LowRankFactor
from anisonoise._src.refresh import LowRankNoiseState
from anisonoise._src.refresh import SgdNoiseState
from anisonoise._src.refresh import TraceFactor
from anisonoise._src.sums import Batches
from anisonoise._src.sums import mean_gradient
from anisonoise._src.transforms import diagonal_noise
from anisonoise._src.transforms import dynamic_isotropic_noise
from anisonoise._src.transforms import hessian_eigvec_noise
from anisonoise._src.transforms import hessian_noise
from anisonoise._src.transforms import isotropic_noise
from anisonoise._src.transforms import leading_noise
from anisonoise._src.training import NoisyTrainState
from anisonoise._src.training import multi_steps
from anisonoise._src.training import nnx_loss
from anisonoise._src.training import with_full_params
from anisonoise._src.transforms import sgd_noise

__version__ = "0.1.0"

__all__ = (
    "AnticorrelatedNoiseState",
    "Batches",
    "DYNAMICS",
    "DiagonalFactor",
    "DiagonalNoiseState",
    "DynamicIsotropicNoiseState",
    "EigenResult",
    "FAMILY_DYNAMICS",
    "GradientNoiseNorms",
    "HessianEigvecNoiseState",
    "HessianNoiseState",
    "HessianSpectrum",
    "IsotropicNoiseState",
    "LeadingNoiseState",
    "LowRankFactor",
    "LowRankNoiseState",
    "MonteCarloEstimate",
    "MultiplicativeNoiseState",
    "NoisyTrainState",
    "OUEscapeEfficiency",
    "SgdNoiseState",
    "TraceFactor",
    "SpectralDensity",
    "anticorrelated_noise",
    "covariance_diagonal",
    "covariance_operator",
    "covariance_trace",
    "diagonal_noise",
    "dynamic_isotropic_noise",
    "dynamics_noise",
    "escape_indicator",
    "escape_ratio",
    "expected_sharpness",
    "gradient_noise_norms",
    "hessian_eigvec_noise",
    "hessian_noise",
    "hessian_operator",
    "hessian_spectrum",
    "hessian_trace",
    "hvp",
    "isotropic_escape_indicator",
    "isotropic_noise",
    "leading_noise",
    "map_chunks",
    "mean_gradient",
    "multiplicative_noise",
    "multi_steps",
    "nnx_loss",
    "num_examples",
    "ou_escape_efficiency",
    "param_block",
    "param_blocks",
    "per_example_grads",
    "projection_coefficient",
    "sample_sgd_noise",
    "sgd_noise",
    "sgd_noise_sampler",
    "spectral_density",
    "top_eigenpairs",
    "with_full_params",
)
