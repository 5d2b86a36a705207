"""perceiver/configs.py: the presets build what they say, and ``validate`` names the field
of a config that cannot build a working model before anything is traced."""

import pytest

from perceiver import configs


@pytest.mark.parametrize('preset', ['language_mlm', 'language_mlm_plusplus', 'small', 'tiny'])
def test_every_preset_validates(preset):
  configs.validate(getattr(configs, preset)())


@pytest.mark.parametrize('field, value, message', [
    # The released model: 1280 latent channels, 8 heads; qk 256; decoder 8 heads.
    ('encoder.num_self_attend_heads', 7,
     'encoder.num_z_channels (1280) must be divisible by encoder.num_self_attend_heads (7)'),
    ('encoder.num_cross_attend_heads', 3,
     'encoder.num_z_channels (1280) must be divisible by encoder.num_cross_attend_heads (3)'),
    ('encoder.qk_channels', 260,
     'encoder.qk_channels (260) must be divisible by encoder.num_self_attend_heads (8)'),
    ('encoder.v_channels', 1284,
     'encoder.v_channels (1284) must be divisible by encoder.num_self_attend_heads (8)'),
    ('decoder.num_heads', 3, 'decoder.qk_channels (256) must be divisible by '
     'decoder.num_heads (3)'),
    ('decoder.v_channels', 772,
     'decoder.v_channels (772) must be divisible by decoder.num_heads (8)'),
    ('decoder.num_heads', 0, 'decoder.num_heads (0) must be an integer >= 1'),
])
def test_heads_that_do_not_divide_the_widths_are_named(field, value, message):
  config = configs.language_mlm()
  block, name = field.split('.')
  config[block][name] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    configs.validate(config)
