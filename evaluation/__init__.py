"""Sample-quality metrics (FID / KID / IS on clean-fid); see issue [5/7]."""
