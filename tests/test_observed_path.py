"""ObservedRateOU: the Kalman-filter likelihood equals the joint Gaussian's."""

import torch

from pyro_latdiff.testing import ObservedRateOU


def test_kalman_likelihood_equals_the_joint_gaussian():
    problem = ObservedRateOU(num_steps=5)
    z = problem.simulate(-0.78)
    rates = torch.tensor([-0.5, 0.3], dtype=torch.float64)
    expected = []
    for rate in rates:
        a = 1 + rate * problem.dt
        n = problem.num_steps
        mean = torch.stack([problem.x0 * a ** (k + 1) for k in range(n)])
        cov = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                terms = [a ** (i - k) * a ** (j - k) for k in range(min(i, j) + 1)]
                cov[i, j] = sum(terms) * problem.diffusion**2 * problem.dt
        cov += torch.eye(n, dtype=torch.float64) * problem.obs_scale**2
        expected.append(torch.distributions.MultivariateNormal(mean, cov).log_prob(z))
    assert torch.allclose(problem.log_likelihood(rates, z), torch.stack(expected), rtol=1e-10)


def test_exact_posterior_is_a_density():
    problem = ObservedRateOU()
    z = problem.simulate(-0.78)
    grid, density, mean, sd = problem.exact_posterior(z)
    assert torch.isclose((density * (grid[1] - grid[0])).sum(), torch.tensor(1.0).double())
    assert -1.5 < mean < 0.0 and 0 < sd < 0.5
