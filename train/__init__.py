"""PPO training for kvjax (PureJaxRL style): `train.ppo.make_train`, the actor-critic in
`train.networks`, checkpoints in `train.checkpoint`, evaluation in `train.evaluate`."""
