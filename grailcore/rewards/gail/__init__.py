"""Parts of GRAIL's discriminator (`grailcore.rewards.discriminator`): action-first input
encoding and the objective (reward transforms, weighted training rows, loss)."""
