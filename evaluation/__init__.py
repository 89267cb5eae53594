"""Sample quality for the jobs: Inception features, FID / KID / IS (clean-fid), reference statistics, resumable
sampling rounds, sampler-comparison tables."""
