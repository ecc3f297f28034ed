"""macro_jax: learning macroscopic dynamics from partial microscopic forces.

float64 is enabled because the d x d Gram systems of the pseudo-inverse are
formed and solved in float64 (float32 normal equations fail once cond(J)
passes ~1e3). Models, data and training run in float32: every array the
package creates names its dtype.
"""

import jax

jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"
